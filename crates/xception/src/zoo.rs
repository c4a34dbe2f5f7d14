//! Named pretrained weights: a registry of where they are published and how to check them, and a
//! download cache (resumable, checksum-verified, atomically renamed, usable offline).
//!
//! Checksums are the publishers' own: Keras states an MD5 per file (`file_hash` in
//! `keras/src/applications/xception.py`), timm's GitHub-release checkpoints carry the first hex
//! digits of their SHA-256 in the file name (torch.hub's convention). Where nothing is published
//! (timm's Hugging Face files) the registry says so, and only the size and format are checked.

use crate::arch::Variant;
use crate::error::{Error, Result};
use sha2::Digest;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// What the publisher states about a file's content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checksum {
    Sha256(&'static str),
    /// Keras publishes MD5s.
    Md5(&'static str),
    /// The leading hex digits of the SHA-256 (torch.hub file-name convention).
    Sha256Prefix(&'static str),
    /// Nothing published; the download is only checked for size (if known) and format on load.
    Unpublished,
}

/// One downloadable weight file.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// `model.tag`, as timm names pretrained weights.
    pub name: &'static str,
    pub model: Variant,
    pub url: &'static str,
    pub file_name: &'static str,
    pub size: Option<u64>,
    pub checksum: Checksum,
    /// Centre-crop fraction of the evaluation transform these weights were evaluated with
    /// (timm's pretrained config); None for Keras' full-image resize.
    pub crop_pct: Option<f64>,
    pub source: &'static str,
}

/// Every named weight file we know of.
pub const REGISTRY: &[Entry] = &[
    Entry {
        name: "xception.keras_imagenet",
        model: Variant::Xception,
        url: "https://storage.googleapis.com/tensorflow/keras-applications/xception/xception_weights_tf_dim_ordering_tf_kernels.h5",
        file_name: "xception_weights_tf_dim_ordering_tf_kernels.h5",
        size: None,
        checksum: Checksum::Md5("0a58e3b7378bc2990ea3b43d5981f1f6"),
        crop_pct: None,
        source: "Keras applications, ImageNet, with the 1000-class top (keras/src/applications/xception.py)",
    },
    Entry {
        name: "xception.keras_imagenet_notop",
        model: Variant::Xception,
        url: "https://storage.googleapis.com/tensorflow/keras-applications/xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
        file_name: "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
        size: None,
        checksum: Checksum::Md5("b0042744bf5b25fce3cb969f33bebb97"),
        crop_pct: None,
        source: "Keras applications, ImageNet, no top",
    },
    Entry {
        name: "legacy_xception.tf_in1k",
        model: Variant::LegacyXception,
        url: "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-cadene/xception-43020ad28.pth",
        file_name: "xception-43020ad28.pth",
        size: None,
        checksum: Checksum::Sha256Prefix("43020ad28"),
        crop_pct: Some(0.8975),
        source: "timm legacy_xception.tf_in1k (Keras weights ported by Cadene)",
    },
    Entry {
        name: "xception41.tf_in1k",
        model: Variant::Xception41,
        url: "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/tf_xception_41-e6439c97.pth",
        file_name: "tf_xception_41-e6439c97.pth",
        size: None,
        checksum: Checksum::Sha256Prefix("e6439c97"),
        crop_pct: Some(0.903),
        source: "timm xception41.tf_in1k (TF DeepLab ImageNet checkpoint)",
    },
    Entry {
        name: "xception65.tf_in1k",
        model: Variant::Xception65,
        url: "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/tf_xception_65-c9ae96e8.pth",
        file_name: "tf_xception_65-c9ae96e8.pth",
        size: None,
        checksum: Checksum::Sha256Prefix("c9ae96e8"),
        crop_pct: Some(0.903),
        source: "timm xception65.tf_in1k (TF DeepLab ImageNet checkpoint)",
    },
    Entry {
        name: "xception71.tf_in1k",
        model: Variant::Xception71,
        url: "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/tf_xception_71-8eec7df1.pth",
        file_name: "tf_xception_71-8eec7df1.pth",
        size: None,
        checksum: Checksum::Sha256Prefix("8eec7df1"),
        crop_pct: Some(0.903),
        source: "timm xception71.tf_in1k (TF DeepLab ImageNet checkpoint)",
    },
    Entry {
        name: "xception65.ra3_in1k",
        model: Variant::Xception65,
        url: "https://huggingface.co/timm/xception65.ra3_in1k/resolve/main/model.safetensors",
        file_name: "xception65.ra3_in1k.safetensors",
        size: None,
        checksum: Checksum::Unpublished,
        crop_pct: Some(0.94),
        source: "timm xception65.ra3_in1k (Hugging Face hub; no checksum published in timm)",
    },
    Entry {
        name: "xception41p.ra3_in1k",
        model: Variant::Xception41p,
        url: "https://huggingface.co/timm/xception41p.ra3_in1k/resolve/main/model.safetensors",
        file_name: "xception41p.ra3_in1k.safetensors",
        size: None,
        checksum: Checksum::Unpublished,
        crop_pct: Some(0.94),
        source: "timm xception41p.ra3_in1k (Hugging Face hub; no checksum published in timm)",
    },
    Entry {
        name: "xception65p.ra3_in1k",
        model: Variant::Xception65p,
        url: "https://huggingface.co/timm/xception65p.ra3_in1k/resolve/main/model.safetensors",
        file_name: "xception65p.ra3_in1k.safetensors",
        size: None,
        checksum: Checksum::Unpublished,
        crop_pct: Some(0.94),
        source: "timm xception65p.ra3_in1k (Hugging Face hub; no checksum published in timm)",
    },
];

/// The entry named `name` (`xception65.tf_in1k`), or for `imagenet` the default ImageNet weights
/// of `model` (with or without the classifier for Keras' file).
pub fn lookup(name: &str, model: Option<Variant>, include_top: bool) -> Result<&'static Entry> {
    if name == "imagenet" {
        let model = model.ok_or_else(|| Error::Config("--weights imagenet needs --model".into()))?;
        let wanted = match model {
            Variant::Xception if include_top => "xception.keras_imagenet",
            Variant::Xception => "xception.keras_imagenet_notop",
            Variant::LegacyXception => "legacy_xception.tf_in1k",
            Variant::Xception41 => "xception41.tf_in1k",
            Variant::Xception65 => "xception65.tf_in1k",
            Variant::Xception71 => "xception71.tf_in1k",
            Variant::Xception41p => "xception41p.ra3_in1k",
            Variant::Xception65p => "xception65p.ra3_in1k",
            Variant::XceptionTiny => return Err(Error::Config("xception_tiny has no pretrained weights; train it with `xception train --model xception_tiny`".into())),
        };
        return lookup(wanted, None, include_top);
    }
    REGISTRY.iter().find(|e| e.name == name).ok_or_else(|| {
        let known: Vec<&str> = REGISTRY.iter().map(|e| e.name).collect();
        Error::Config(format!("unknown weights '{name}'; named weights: imagenet, {}", known.join(", ")))
    })
}

/// True when `s` names registry weights rather than a file.
pub fn is_name(s: &str) -> bool {
    s == "imagenet" || REGISTRY.iter().any(|e| e.name == s)
}

/// Where downloads go: `$XCEPTION_CACHE`, else `$XDG_CACHE_HOME/xception/weights`, else
/// `~/.cache/xception/weights`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XCEPTION_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("xception").join("weights")
}

/// How to fetch.
#[derive(Clone, Debug, Default)]
pub struct FetchOptions {
    /// Never touch the network (also set by `XCEPTION_OFFLINE=1`).
    pub offline: bool,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Cache directory (default [`cache_dir`]).
    pub cache: Option<PathBuf>,
}

/// The cached file for `entry`, downloading it first if needed. A download resumes from a
/// previous partial file, is verified against the published size and checksum, and only then
/// renamed into place; a mismatching file is deleted and reported.
pub fn fetch(entry: &Entry, options: &FetchOptions) -> Result<PathBuf> {
    let dir = options.cache.clone().unwrap_or_else(cache_dir);
    let path = dir.join(entry.file_name);
    if path.is_file() {
        return Ok(path);
    }
    let offline = options.offline || std::env::var("XCEPTION_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0");
    if offline {
        return Err(Error::file(
            &path,
            format!("weights '{}' are not cached and downloads are off (offline); fetch {} to this path, or go online", entry.name, entry.url),
        ));
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let partial = dir.join(format!("{}.partial", entry.file_name));
    download(entry, &partial, options.progress)?;
    if let Err(e) = verify(entry, &partial) {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, &path).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

fn download(entry: &Entry, partial: &Path, progress: bool) -> Result<()> {
    let have = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(std::time::Duration::from_secs(20)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = agent.get(entry.url);
    if have > 0 {
        request = request.header("Range", format!("bytes={have}-"));
    }
    let net_err = |e: String| Error::Config(format!("downloading {} from {}: {e}", entry.name, entry.url));
    let response = request.call().map_err(|e| net_err(e.to_string()))?;
    let status = response.status().as_u16();
    let resumed = status == 206 && have > 0;
    if !(status == 200 || resumed) {
        return Err(net_err(format!("HTTP {status}")));
    }
    let length = response.headers().get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let start = if resumed { have } else { 0 };
    let total = length.map(|l| l + start).or(entry.size);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(partial)
        .map_err(|e| Error::io(partial, e))?;
    let bar = progress.then(|| {
        let bar = indicatif::ProgressBar::new(total.unwrap_or(0));
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(entry.name.to_string());
        bar.set_position(start);
        bar
    });
    let mut body = response.into_body().into_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut written = start;
    loop {
        let n = body.read(&mut buf).map_err(|e| net_err(format!("transfer broke after {written} bytes ({e}); run again to resume")))?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).map_err(|e| Error::io(partial, e))?;
        written += n as u64;
        if let Some(b) = &bar {
            b.set_position(written);
        }
    }
    file.sync_all().map_err(|e| Error::io(partial, e))?;
    if let Some(b) = bar {
        b.finish();
    }
    if let Some(t) = total {
        if written < t {
            return Err(net_err(format!("transfer ended after {written} of {t} bytes; run again to resume")));
        }
    }
    Ok(())
}

/// Checks size and the published checksum of a downloaded file.
pub fn verify(entry: &Entry, path: &Path) -> Result<()> {
    let len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    if let Some(size) = entry.size {
        if len != size {
            return Err(Error::file(path, format!("{} is {len} bytes, expected {size}", entry.name)));
        }
    }
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut sha = sha2::Sha256::new();
    let mut md5 = md5::Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        md5.update(&buf[..n]);
    }
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let (sha, md5) = (hex(&sha.finalize()), hex(&md5.finalize()));
    let ok = match entry.checksum {
        Checksum::Sha256(h) => sha == h,
        Checksum::Md5(h) => md5 == h,
        Checksum::Sha256Prefix(p) => sha.starts_with(p),
        Checksum::Unpublished => true,
    };
    if !ok {
        return Err(Error::file(path, format!("checksum mismatch for {}: expected {:?}, got sha256 {sha} / md5 {md5}", entry.name, entry.checksum)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imagenet_resolves_for_every_variant_and_names_are_unique() {
        for v in Variant::ALL.into_iter().filter(|&v| v != Variant::XceptionTiny) {
            let e = lookup("imagenet", Some(v), true).unwrap();
            assert_eq!(e.model, v);
        }
        assert!(lookup("imagenet", Some(Variant::XceptionTiny), true).unwrap_err().to_string().contains("no pretrained weights"));
        assert_eq!(lookup("imagenet", Some(Variant::Xception), false).unwrap().name, "xception.keras_imagenet_notop");
        let mut names: Vec<&str> = REGISTRY.iter().map(|e| e.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), REGISTRY.len());
        assert!(lookup("resnet.imagenet", None, true).unwrap_err().to_string().contains("xception65.tf_in1k"));
        assert!(lookup("imagenet", None, true).is_err());
    }
}
