//! Prometheus metrics: requests, latencies, batch sizes, queue depth, errors.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub code: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<EndpointLabels, Histogram>,
    pub batch_size: Family<ModelLabels, Histogram>,
    pub inference_seconds: Family<ModelLabels, Histogram>,
    pub queue_depth: Family<ModelLabels, Gauge>,
    pub errors: Family<ErrorLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let requests = Family::<RequestLabels, Counter>::default();
        // 1 ms .. ~65 s
        let latency = Family::<EndpointLabels, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 17)));
        let batch_size = Family::<ModelLabels, Histogram>::new_with_constructor(|| Histogram::new([1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0]));
        let inference_seconds = Family::<ModelLabels, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 17)));
        let queue_depth = Family::<ModelLabels, Gauge>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let mut registry = Registry::with_prefix("xception");
        registry.register("http_requests", "HTTP requests answered, by endpoint and status", requests.clone());
        registry.register("http_request_duration_seconds", "Time from request to response, by endpoint", latency.clone());
        registry.register("batch_size", "Requests run together in one forward pass", batch_size.clone());
        registry.register("inference_duration_seconds", "Time of one batched forward pass", inference_seconds.clone());
        registry.register("queue_depth", "Requests waiting for inference", queue_depth.clone());
        registry.register("errors", "Requests refused or failed, by error code", errors.clone());
        Metrics { registry, requests, latency, batch_size, inference_seconds, queue_depth, errors }
    }

    pub fn error(&self, code: &str) {
        self.errors.get_or_create(&ErrorLabels { code: code.into() }).inc();
    }

    /// The OpenMetrics text exposition (which Prometheus scrapes).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}
