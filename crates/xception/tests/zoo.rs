//! The download cache against a small HTTP server on 127.0.0.1 started by the test: download,
//! resume after a broken transfer, checksum mismatch, offline use.

use sha2::Digest;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use xception::zoo::{fetch, Checksum, Entry, FetchOptions};
use xception::Variant;

#[derive(Default)]
struct Log {
    requests: Vec<Option<u64>>, // Range start of each request
}

/// Serves `payload` at any path. The first `break_first` requests send only `cut` bytes of the
/// body (with the full Content-Length) and close: a broken transfer. Range requests get 206.
fn serve(payload: Vec<u8>, break_first: usize, cut: usize) -> (String, Arc<Mutex<Log>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/weights.bin", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Log::default()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for (i, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut range = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(r) = lower.strip_prefix("range: bytes=") {
                    range = r.trim().trim_end_matches('-').parse::<u64>().ok();
                }
            }
            log2.lock().unwrap().requests.push(range);
            let start = range.unwrap_or(0) as usize;
            let body = &payload[start.min(payload.len())..];
            let status = if range.is_some() { "206 Partial Content" } else { "200 OK" };
            let head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = stream.write_all(head.as_bytes());
            let send = if i < break_first { &body[..cut.min(body.len())] } else { body };
            let _ = stream.write_all(send);
            let _ = stream.flush();
        }
    });
    (url, log)
}

fn payload() -> Vec<u8> {
    (0..300_000u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect()
}

fn sha256_hex(data: &[u8]) -> String {
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn entry(url: String, checksum: Checksum, size: Option<u64>) -> Entry {
    Entry {
        name: "test.weights",
        model: Variant::Xception41,
        url: Box::leak(url.into_boxed_str()),
        file_name: "test-weights.bin",
        size,
        checksum,
        crop_pct: None,
        source: "test server",
    }
}

fn cache(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xception-zoo-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn opts(dir: &PathBuf) -> FetchOptions {
    FetchOptions { offline: false, progress: false, cache: Some(dir.clone()) }
}

#[test]
fn downloads_verifies_and_caches() {
    let data = payload();
    let (url, log) = serve(data.clone(), 0, 0);
    let hash: &'static str = Box::leak(sha256_hex(&data).into_boxed_str());
    let e = entry(url, Checksum::Sha256(hash), Some(data.len() as u64));
    let dir = cache("ok");
    let path = fetch(&e, &opts(&dir)).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert!(!dir.join("test-weights.bin.partial").exists());
    // Second time: from the cache, no request.
    fetch(&e, &opts(&dir)).unwrap();
    assert_eq!(log.lock().unwrap().requests.len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resumes_after_a_broken_transfer() {
    let data = payload();
    let (url, log) = serve(data.clone(), 1, 120_000);
    let prefix: &'static str = Box::leak(sha256_hex(&data)[..9].to_string().into_boxed_str());
    let e = entry(url, Checksum::Sha256Prefix(prefix), None);
    let dir = cache("resume");
    let err = fetch(&e, &opts(&dir)).unwrap_err().to_string();
    assert!(err.contains("resume"), "{err}");
    assert_eq!(std::fs::metadata(dir.join("test-weights.bin.partial")).unwrap().len(), 120_000);
    assert!(!dir.join("test-weights.bin").exists(), "no final file from a broken transfer");
    let path = fetch(&e, &opts(&dir)).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(log.lock().unwrap().requests, vec![None, Some(120_000)], "the second request resumes with Range");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn checksum_mismatch_is_refused_and_nothing_is_kept() {
    let data = payload();
    let (url, _) = serve(data.clone(), 0, 0);
    let e = entry(url, Checksum::Md5("00000000000000000000000000000000"), None);
    let dir = cache("mismatch");
    let err = fetch(&e, &opts(&dir)).unwrap_err().to_string();
    assert!(err.contains("checksum mismatch") && err.contains("test.weights"), "{err}");
    assert!(!dir.join("test-weights.bin").exists() && !dir.join("test-weights.bin.partial").exists());
    // The right MD5 (computed independently) passes.
    let md5: String = md5::Md5::digest(&data).iter().map(|b| format!("{b:02x}")).collect();
    let e = entry(e.url.to_string(), Checksum::Md5(Box::leak(md5.into_boxed_str())), None);
    fetch(&e, &opts(&dir)).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn offline_uses_the_cache_or_says_what_is_missing() {
    let dir = cache("offline");
    // Nothing listens on this port: offline mode must not even try.
    let e = entry("http://127.0.0.1:9/never".into(), Checksum::Unpublished, None);
    let offline = FetchOptions { offline: true, progress: false, cache: Some(dir.clone()) };
    let err = fetch(&e, &offline).unwrap_err().to_string();
    assert!(err.contains("offline") && err.contains("test-weights.bin") && err.contains("http://127.0.0.1:9/never"), "{err}");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("test-weights.bin"), b"cached").unwrap();
    assert_eq!(fetch(&e, &offline).unwrap(), dir.join("test-weights.bin"));
    // Online but unreachable: a clear error naming the URL.
    let e2 = Entry { file_name: "other.bin", ..e.clone() };
    let err = fetch(&e2, &opts(&dir)).unwrap_err().to_string();
    assert!(err.contains("http://127.0.0.1:9/never"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
