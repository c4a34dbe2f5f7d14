//! Image decoding and the references' preprocessing, pixel-exact.
//!
//! Keras (`keras.utils.load_img` + `preprocess_input(mode='tf')`) and timm's eval transform both
//! resize with Pillow, so [`pil_resize`] reproduces Pillow's resampling: its nearest-neighbour
//! affine scale (double-precision accumulated source coordinates) and its two-pass convolution
//! resampler for bilinear/bicubic (coefficients in double, 22-bit fixed point, uint8 rounding
//! between the horizontal and the vertical pass).

use crate::arch::Variant;
use crate::error::{Error, Result};
use image::RgbImage;
use std::path::Path;

/// Resampling filter, with Pillow's semantics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resize {
    Nearest,
    Bilinear,
    Bicubic,
}

impl Resize {
    pub fn parse(s: &str) -> Result<Resize> {
        match s {
            "nearest" => Ok(Resize::Nearest),
            "bilinear" => Ok(Resize::Bilinear),
            "bicubic" => Ok(Resize::Bicubic),
            _ => Err(Error::Config(format!("unknown resize '{s}' (expected nearest, bilinear or bicubic)"))),
        }
    }
}

/// Which reference's input pipeline to reproduce.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Preprocess {
    /// Keras: resize the whole image to size x size (aspect not kept), then x / 127.5 - 1.
    Keras { size: usize, resize: Resize },
    /// timm eval: resize the shorter side to floor(size / crop_pct), centre-crop size x size,
    /// x / 255, then (x - mean) / std.
    Timm { size: usize, resize: Resize, crop_pct: f64, mean: [f32; 3], std: [f32; 3] },
}

impl Preprocess {
    pub fn size(&self) -> usize {
        match *self {
            Preprocess::Keras { size, .. } | Preprocess::Timm { size, .. } => size,
        }
    }

    /// timm's eval transform for a variant's pretrained config (mean/std 0.5: Inception style).
    pub fn timm(size: usize, crop_pct: f64, resize: Resize) -> Preprocess {
        Preprocess::Timm { size, resize, crop_pct, mean: [0.5; 3], std: [0.5; 3] }
    }

    /// What the reference of `variant` does with its published weights: Keras' nearest resize
    /// for `xception`; timm's bicubic resize and centre crop with the pretrained config's crop_pct
    /// (0.8975 legacy_xception, 0.903 the TF-ported aligned nets, 0.94 the ra3 pre-act nets).
    pub fn default_for(variant: Variant, size: usize) -> Preprocess {
        match variant {
            Variant::Xception => Preprocess::Keras { size, resize: Resize::Nearest },
            Variant::LegacyXception => Preprocess::timm(size, 0.8975, Resize::Bicubic),
            Variant::Xception41 | Variant::Xception65 | Variant::Xception71 | Variant::XceptionTiny => Preprocess::timm(size, 0.903, Resize::Bicubic),
            Variant::Xception41p | Variant::Xception65p => Preprocess::timm(size, 0.94, Resize::Bicubic),
        }
    }

    /// The same pipeline with another resampling filter.
    pub fn with_resize(self, resize: Resize) -> Preprocess {
        match self {
            Preprocess::Keras { size, .. } => Preprocess::Keras { size, resize },
            Preprocess::Timm { size, crop_pct, mean, std, .. } => Preprocess::Timm { size, resize, crop_pct, mean, std },
        }
    }

    /// Applies the pipeline to a decoded RGB image: HWC float32.
    pub fn apply(&self, img: &RgbImage) -> Vec<f32> {
        match *self {
            Preprocess::Keras { size, resize } => {
                let img = pil_resize(img, size as u32, size as u32, resize);
                img.as_raw().iter().map(|&v| v as f32 / 127.5 - 1.0).collect()
            }
            Preprocess::Timm { size, resize, crop_pct, .. } => self.normalize(&timm_resize_crop(img, size, crop_pct, resize)),
        }
    }

    /// The value mapping alone, on an image already at the input size (training augmentation
    /// crops and resizes on its own).
    pub fn normalize(&self, img: &RgbImage) -> Vec<f32> {
        match *self {
            Preprocess::Keras { .. } => img.as_raw().iter().map(|&v| v as f32 / 127.5 - 1.0).collect(),
            Preprocess::Timm { mean, std, .. } => img.as_raw().iter().enumerate().map(|(i, &v)| (v as f32 / 255.0 - mean[i % 3]) / std[i % 3]).collect(),
        }
    }
}

/// torchvision `Resize(int)` on the shorter side then `CenterCrop`, as timm's eval transform.
pub fn timm_resize_crop(img: &RgbImage, size: usize, crop_pct: f64, resize: Resize) -> RgbImage {
    let scale_size = (size as f64 / crop_pct).floor() as u64;
    let (w, h) = (img.width() as u64, img.height() as u64);
    // torchvision: the long side becomes int(short_target * long / short).
    let (nw, nh) = if w <= h {
        (scale_size, ((scale_size * h) as f64 / w as f64) as u64)
    } else {
        (((scale_size * w) as f64 / h as f64) as u64, scale_size)
    };
    let resized = pil_resize(img, nw as u32, nh as u32, resize);
    center_crop(&resized, size as u32)
}

/// torchvision `center_crop`: offsets int(round((n - crop) / 2)) with Python's half-to-even round;
/// zero padding where the image is smaller than the crop.
fn center_crop(img: &RgbImage, crop: u32) -> RgbImage {
    let offset = |n: u32| ((n as f64 - crop as f64) / 2.0).round_ties_even() as i64;
    let (top, left) = (offset(img.height()), offset(img.width()));
    RgbImage::from_fn(crop, crop, |x, y| {
        let (sx, sy) = (x as i64 + left, y as i64 + top);
        if sx >= 0 && sy >= 0 && (sx as u32) < img.width() && (sy as u32) < img.height() {
            *img.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

/// Pillow's `Image.resize(size, resample)` for an RGB image.
pub fn pil_resize(img: &RgbImage, width: u32, height: u32, filter: Resize) -> RgbImage {
    if img.width() == width && img.height() == height {
        return img.clone();
    }
    match filter {
        Resize::Nearest => nearest(img, width, height),
        Resize::Bilinear | Resize::Bicubic => {
            // Horizontal pass first, then vertical, each rounding to uint8 (Pillow's order).
            let tmp = if width != img.width() { resample_axis(img, width, filter, true) } else { img.clone() };
            if height != img.height() {
                resample_axis(&tmp, height, filter, false)
            } else {
                tmp
            }
        }
    }
}

/// Pillow's `ImagingScaleAffine`: source coordinate accumulated in double, truncated.
fn nearest(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let table = |in_size: u32, out_size: u32| -> Vec<u32> {
        let step = in_size as f64 / out_size as f64;
        let mut pos = step * 0.5;
        (0..out_size)
            .map(|_| {
                let i = (pos as i64).clamp(0, in_size as i64 - 1) as u32;
                pos += step;
                i
            })
            .collect()
    };
    let xs = table(img.width(), width);
    let ys = table(img.height(), height);
    RgbImage::from_fn(width, height, |x, y| *img.get_pixel(xs[x as usize], ys[y as usize]))
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`: per output pixel, the first source
/// index and fixed-point weights.
fn coefficients(in_size: u32, out_size: u32, filter: Resize) -> Vec<(usize, Vec<i32>)> {
    let (f, support): (fn(f64) -> f64, f64) = match filter {
        Resize::Bilinear => (bilinear_filter, 1.0),
        _ => (bicubic_filter, 2.0),
    };
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
            let mut k: Vec<f64> = (0..xmax.max(0)).map(|x| f((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|v| *v /= ww);
            }
            let one = (1u32 << PRECISION_BITS) as f64;
            let fixed = k
                .into_iter()
                .map(|v| if v < 0.0 { (-0.5 + v * one) as i32 } else { (0.5 + v * one) as i32 })
                .collect();
            (xmin as usize, fixed)
        })
        .collect()
}

fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

fn resample_axis(img: &RgbImage, out_size: u32, filter: Resize, horizontal: bool) -> RgbImage {
    let in_size = if horizontal { img.width() } else { img.height() };
    let coeffs = coefficients(in_size, out_size, filter);
    let (w, h) = if horizontal { (out_size, img.height()) } else { (img.width(), out_size) };
    RgbImage::from_fn(w, h, |x, y| {
        let (o, rest) = if horizontal { (x, y) } else { (y, x) };
        let (start, k) = &coeffs[o as usize];
        let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
        for (i, &kv) in k.iter().enumerate() {
            let s = (start + i) as u32;
            let p = if horizontal { img.get_pixel(s, rest) } else { img.get_pixel(rest, s) };
            for c in 0..3 {
                acc[c] = acc[c].wrapping_add((p.0[c] as i32).wrapping_mul(kv));
            }
        }
        image::Rgb([clip8(acc[0]), clip8(acc[1]), clip8(acc[2])])
    })
}

/// Largest image we decode (pixels per side), refusing decompression bombs before allocation.
pub const MAX_IMAGE_SIDE: u32 = 16384;

/// Decodes a JPEG, PNG or WebP file to 8-bit RGB as Pillow's `convert('RGB')` does (grey is
/// replicated, alpha dropped). No EXIF rotation, like Keras' and timm's loaders. JPEG goes
/// through libjpeg-turbo with Pillow's settings (accurate integer IDCT, fancy upsampling), so the
/// pixels are the ones Keras and timm see.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes, path, MAX_IMAGE_SIDE as u64 * MAX_IMAGE_SIDE as u64)
}

/// Width and height an encoded image declares in its header, read without decoding any pixels.
pub fn image_dimensions(bytes: &[u8], source: &Path) -> Result<(u32, u32)> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        let err = |e: turbojpeg::Error| Error::file(source, format!("cannot read JPEG header: {e}"));
        let header = turbojpeg::Decompressor::new().map_err(err)?.read_header(bytes).map_err(err)?;
        let side = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        return Ok((side(header.width), side(header.height)));
    }
    image_reader(bytes, source)?
        .into_dimensions()
        .map_err(|e| Error::file(source, format!("cannot read image header: {e}")))
}

/// [`load_image`] on bytes already in memory (`source` names them in errors). The header is read
/// first, and an image declaring more than `max_pixels` pixels, or more than [`MAX_IMAGE_SIDE`]
/// per side, is refused before anything is allocated for it.
pub fn decode_image(bytes: &[u8], source: &Path, max_pixels: u64) -> Result<RgbImage> {
    let (w, h) = image_dimensions(bytes, source)?;
    if w == 0 || h == 0 {
        return Err(Error::file(source, format!("image declares {w}x{h} pixels")));
    }
    check_declared_size(w, h, max_pixels, source)?;
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        if let Some(img) = decode_jpeg(bytes, source)? {
            return Ok(img);
        }
    }
    let mut reader = image_reader(bytes, source)?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(1 << 30);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| Error::file(source, format!("cannot decode image: {e}")))?;
    Ok(img.to_rgb8())
}

/// Refuses an image whose header declares more than [`MAX_IMAGE_SIDE`] per side or more than
/// `max_pixels` in all: the decompression-bomb guard, applied before decoding.
pub fn check_declared_size(w: u32, h: u32, max_pixels: u64, source: &Path) -> Result<()> {
    if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE {
        return Err(Error::file(source, format!("image declares {w}x{h} pixels; at most {MAX_IMAGE_SIDE} per side are accepted")));
    }
    if w as u64 * h as u64 > max_pixels {
        return Err(Error::file(source, format!("image declares {w}x{h} = {} pixels; at most {max_pixels} are accepted", w as u64 * h as u64)));
    }
    Ok(())
}

/// The image crate's reader for a PNG or WebP (or JPEG that libjpeg-turbo cannot turn into RGB).
fn image_reader<'a>(bytes: &'a [u8], source: &Path) -> Result<image::ImageReader<std::io::Cursor<&'a [u8]>>> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::io(source, e))?;
    if reader.format().is_none() {
        return Err(Error::file(source, "not a recognised image (expected JPEG, PNG or WebP)"));
    }
    Ok(reader)
}

/// libjpeg-turbo decode of RGB and greyscale JPEGs; None for colour spaces it cannot turn into
/// RGB (CMYK), which the pure-Rust decoder then handles.
fn decode_jpeg(bytes: &[u8], path: &Path) -> Result<Option<RgbImage>> {
    let err = |e: turbojpeg::Error| Error::file(path, format!("cannot decode JPEG: {e}"));
    let mut d = turbojpeg::Decompressor::new().map_err(err)?;
    let header = d.read_header(bytes).map_err(err)?;
    let (w, h) = (header.width, header.height);
    let grey = match header.colorspace {
        turbojpeg::Colorspace::Gray => true,
        turbojpeg::Colorspace::YCbCr | turbojpeg::Colorspace::RGB => false,
        _ => return Ok(None),
    };
    let format = if grey { turbojpeg::PixelFormat::GRAY } else { turbojpeg::PixelFormat::RGB };
    let pitch = w * format.size();
    let mut pixels = vec![0u8; h * pitch];
    let image = turbojpeg::Image { pixels: &mut pixels[..], width: w, pitch, height: h, format };
    d.decompress(bytes, image).map_err(err)?;
    let rgb = if grey { pixels.iter().flat_map(|&v| [v, v, v]).collect() } else { pixels };
    Ok(Some(RgbImage::from_raw(w as u32, h as u32, rgb).expect("buffer matches dimensions")))
}

/// One preprocessed input: HWC float32 and where it came from.
#[derive(Clone, Debug)]
pub struct Item {
    pub name: String,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

/// Loads images and `.npy` arrays (float32 (N,H,W,3) or (H,W,3), already preprocessed).
pub fn load_items(paths: &[impl AsRef<Path>], preprocess: &Preprocess) -> Result<Vec<Item>> {
    if paths.is_empty() {
        return Err(Error::Config("no input given".into()));
    }
    let mut items = Vec::new();
    for p in paths {
        let path = p.as_ref();
        let name = path.display().to_string();
        if path.extension().and_then(|e| e.to_str()) == Some("npy") {
            let (shape, data) = crate::npy::read_f32(path)?;
            let (n, height, width) = match shape[..] {
                [n, h, w, 3] => (n, h, w),
                [h, w, 3] => (1, h, w),
                _ => {
                    return Err(Error::file(
                        path,
                        format!("array has shape {shape:?}; expected (N, H, W, 3) or (H, W, 3) float32, already preprocessed"),
                    ))
                }
            };
            if let Some(i) = data.iter().position(|v| !v.is_finite()) {
                return Err(Error::file(path, format!("array holds a non-finite value at flat index {i}")));
            }
            if n == 0 || height == 0 || width == 0 {
                return Err(Error::file(path, format!("array of shape {shape:?} is empty")));
            }
            for (i, chunk) in data.chunks_exact(height * width * 3).enumerate() {
                let name = if n == 1 { name.clone() } else { format!("{name}[{i}]") };
                items.push(Item { name, height, width, data: chunk.to_vec() });
            }
        } else {
            let img = load_image(path)?;
            let size = preprocess.size();
            items.push(Item { name, height: size, width: size, data: preprocess.apply(&img) });
        }
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_round_half_to_even_in_center_crop() {
        // (333 - 299) / 2 = 17 exactly; (10 - 7) / 2 = 1.5 -> 2; (8 - 7) / 2 = 0.5 -> 0.
        let img = RgbImage::from_fn(10, 8, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let c = center_crop(&img, 7);
        assert_eq!(c.get_pixel(0, 0).0, [2, 0, 0]);
    }

    #[test]
    fn nearest_downscale_by_two_takes_odd_pixels() {
        let img = RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let r = pil_resize(&img, 4, 4, Resize::Nearest);
        assert_eq!(r.get_pixel(0, 0).0, [1, 1, 0]);
        assert_eq!(r.get_pixel(3, 2).0, [7, 5, 0]);
    }
}
