//! NumPy `.npy` input and output (float32, little-endian, C order, format v1 when it fits).

use crate::error::{Error, Result};
use npyz::WriterBuilder;
use std::io::BufReader;
use std::path::Path;

/// Reads a float32 array; refuses other dtypes, Fortran order, and headers that promise more
/// data than the file holds (so a crafted header cannot make us allocate without bound).
pub fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let npy = npyz::NpyFile::new(BufReader::new(file)).map_err(|e| Error::file(path, format!("not a valid .npy file: {e}")))?;
    let dtype = npy.dtype();
    if !matches!(&dtype, npyz::DType::Plain(t) if t.to_string() == "<f4") {
        return Err(Error::file(path, format!("array has dtype {}; expected little-endian float32 ('<f4')", dtype.descr())));
    }
    if npy.order() != npyz::Order::C {
        return Err(Error::file(path, "array is in Fortran order; save it C-contiguous (np.ascontiguousarray)"));
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let count = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
    match count {
        Some(c) if c.saturating_mul(4) <= file_len => {}
        _ => return Err(Error::file(path, format!("header declares shape {shape:?}, more data than the file holds"))),
    }
    let data = npy.into_vec::<f32>().map_err(|e| Error::file(path, format!("cannot read array data: {e}")))?;
    Ok((shape, data))
}

/// Writes a float32 array atomically ([`crate::atomic`]).
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    assert_eq!(shape.iter().product::<usize>(), data.len());
    let mut buf = Vec::with_capacity(data.len() * 4 + 128);
    {
        let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        let mut w = npyz::WriteOptions::new().default_dtype().shape(&shape).writer(&mut buf).begin_nd().map_err(|e| Error::io(path, e))?;
        w.extend(data.iter().copied()).map_err(|e| Error::io(path, e))?;
        w.finish().map_err(|e| Error::io(path, e))?;
    }
    crate::atomic::write(path, &buf)
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip_and_header_is_numpy_v1() {
        let dir = std::env::temp_dir().join(format!("xception-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.npy");
        super::write_f32(&path, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.5]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let header = String::from_utf8_lossy(&bytes[10..]);
        assert!(header.contains("'descr': '<f4'") && header.contains("'shape': (2, 3"), "{header}");
        let (shape, data) = super::read_f32(&path).unwrap();
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(data[5], 6.5);
        std::fs::write(dir.join("bad.npy"), b"not numpy").unwrap();
        assert!(super::read_f32(&dir.join("bad.npy")).unwrap_err().to_string().contains("bad.npy"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
