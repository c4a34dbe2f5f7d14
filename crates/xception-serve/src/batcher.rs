//! Dynamic batching: requests for one model wait in a bounded queue; one inference thread takes
//! the first, waits up to `max_wait` for more (at most `max_batch`), and runs them in one forward
//! pass. A full queue refuses at once (the caller answers 503) instead of growing; requests
//! whose deadline passed or whose client went away are dropped before they cost any compute.

use crate::metrics::{Metrics, ModelLabels};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use xception::engine::Activations;
use xception::pipeline::Pipeline;
use xception::{Item, Prediction};

/// What a model computes for one request: a classifier's logits and embedding, or a
/// segmentation network's per-pixel logits at its input size.
pub enum Output {
    Prediction(Prediction),
    Segmentation(Activations),
}

/// Why a request got no prediction.
#[derive(Debug)]
pub enum JobError {
    /// Its deadline passed while it waited in the queue.
    Expired,
    /// The forward pass failed (the message names the input).
    Failed(String),
}

pub struct Job {
    pub item: Item,
    pub deadline: Instant,
    pub reply: oneshot::Sender<Result<Output, JobError>>,
}

/// The sending side, held by the HTTP handlers.
pub struct Batcher {
    tx: SyncSender<Job>,
    metrics: Arc<Metrics>,
    labels: ModelLabels,
}

pub struct Batching {
    pub max_batch: usize,
    pub max_wait: Duration,
    pub queue: usize,
}

impl Batcher {
    /// Starts the model's inference thread. It ends once every [`Batcher`] handle is dropped and
    /// the queue is drained, so a graceful shutdown answers everything already accepted.
    pub fn start(name: &str, pipeline: Pipeline, batching: Batching, metrics: Arc<Metrics>) -> std::io::Result<(Batcher, std::thread::JoinHandle<()>)> {
        let (tx, rx) = sync_channel(batching.queue);
        let labels = ModelLabels { model: name.to_string() };
        let worker = Worker { rx, metrics: metrics.clone(), labels: labels.clone(), pipeline, batching };
        let handle = std::thread::Builder::new().name(format!("infer-{name}")).spawn(move || worker.run())?;
        Ok((Batcher { tx, metrics, labels }, handle))
    }

    /// Queues a job, or gives it back when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        let depth = self.metrics.queue_depth.get_or_create(&self.labels).clone();
        depth.inc();
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(job)) | Err(TrySendError::Disconnected(job)) => {
                depth.dec();
                Err(job)
            }
        }
    }

    /// Requests waiting for inference now.
    pub fn depth(&self) -> i64 {
        self.metrics.queue_depth.get_or_create(&self.labels).get()
    }
}

struct Worker {
    rx: Receiver<Job>,
    metrics: Arc<Metrics>,
    labels: ModelLabels,
    pipeline: Pipeline,
    batching: Batching,
}

impl Worker {
    fn run(self) {
        while let Ok(first) = self.rx.recv() {
            let mut batch = vec![self.taken(first)];
            let until = Instant::now() + self.batching.max_wait;
            while batch.len() < self.batching.max_batch {
                let left = until.saturating_duration_since(Instant::now());
                match self.rx.recv_timeout(left) {
                    Ok(job) => batch.push(self.taken(job)),
                    Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            self.run_batch(batch);
        }
    }

    fn taken(&self, job: Job) -> Job {
        self.metrics.queue_depth.get_or_create(&self.labels).dec();
        job
    }

    fn run_batch(&self, batch: Vec<Job>) {
        let now = Instant::now();
        let mut live = Vec::with_capacity(batch.len());
        for job in batch {
            if job.reply.is_closed() {
                continue; // the client is gone (its own timeout, or it hung up)
            }
            if job.deadline <= now {
                let _ = job.reply.send(Err(JobError::Expired));
                continue;
            }
            live.push(job);
        }
        if live.is_empty() {
            return;
        }
        let (items, replies): (Vec<Item>, Vec<_>) = live.into_iter().map(|j| (j.item, j.reply)).unzip();
        self.metrics.batch_size.get_or_create(&self.labels).observe(items.len() as f64);
        let started = Instant::now();
        let result: xception::Result<Vec<Output>> = if self.pipeline.config.segmentation.is_some() {
            // The engine runs a batch image by image anyway; segmentation logits come one by one.
            items.iter().map(|i| self.pipeline.runner.segment(&i.data, i.height, i.width).map(Output::Segmentation)).collect()
        } else {
            self.pipeline.predict(&items, items.len()).map(|p| p.into_iter().map(Output::Prediction).collect())
        };
        self.metrics.inference_seconds.get_or_create(&self.labels).observe(started.elapsed().as_secs_f64());
        match result {
            Ok(outputs) => {
                for (reply, out) in replies.into_iter().zip(outputs) {
                    let _ = reply.send(Ok(out));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for reply in replies {
                    let _ = reply.send(Err(JobError::Failed(message.clone())));
                }
            }
        }
    }
}
