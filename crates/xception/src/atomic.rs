//! Every file the library writes goes through here: into `<name>.<ext>.partial`, flushed and
//! fsynced, renamed into place, then the directory fsynced so the rename survives a crash. An
//! interrupted or failed write never leaves a half-written file under the final name.

use crate::error::{Error, Result};
use std::io::{BufWriter, Write};
use std::path::Path;

/// Writes `path` with `write`, atomically (see the module documentation).
pub fn write_with(path: &Path, write: impl FnOnce(&mut BufWriter<std::fs::File>) -> std::io::Result<()>) -> Result<()> {
    let ext = path.extension().map(|e| format!("{}.partial", e.to_string_lossy())).unwrap_or_else(|| "partial".into());
    let tmp = path.with_extension(ext);
    let result = (|| {
        let mut f = BufWriter::new(std::fs::File::create(&tmp)?);
        write(&mut f)?;
        f.flush()?;
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    result.map_err(|e: std::io::Error| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Writes `bytes` to `path` atomically.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |f| f.write_all(bytes))
}
