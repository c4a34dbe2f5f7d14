//! Semantic segmentation end to end: fit an image into the network's square input the way TF
//! DeepLab evaluates (shrink so the long side fits, pad bottom/right with the mean pixel), turn
//! the per-pixel logits back into a class mask at the image's own size, and draw it.

use crate::engine::{align_corners_taps, Activations};
use crate::error::{Error, Result};
use crate::preprocess::{pil_resize, Resize};
use image::RgbImage;
use std::path::Path;

/// An image placed in the network's input.
pub struct Fitted {
    /// size x size x 3, DeepLab's preprocessing (2/255 x - 1); the padding is 0, the mean pixel.
    pub data: Vec<f32>,
    pub size: usize,
    /// The part of the input the image covers (top-left).
    pub content_h: usize,
    pub content_w: usize,
}

/// Shrinks `img` (Pillow bilinear) so its long side is at most `size`, keeping the aspect
/// ratio, maps pixels to [-1, 1] and pads to `size` x `size` at the bottom and right.
pub fn fit(img: &RgbImage, size: usize) -> Fitted {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let scale = (size as f64 / w.max(h) as f64).min(1.0);
    let (cw, ch) = (((w as f64 * scale).round() as usize).clamp(1, size), ((h as f64 * scale).round() as usize).clamp(1, size));
    let resized;
    let src = if (cw, ch) == (w, h) {
        img
    } else {
        resized = pil_resize(img, cw as u32, ch as u32, Resize::Bilinear);
        &resized
    };
    let mut data = vec![0f32; size * size * 3];
    for y in 0..ch {
        let row = &src.as_raw()[y * cw * 3..][..cw * 3];
        for (d, &v) in data[y * size * 3..][..cw * 3].iter_mut().zip(row) {
            *d = v as f32 / 127.5 - 1.0;
        }
    }
    Fitted { data, size, content_h: ch, content_w: cw }
}

/// The class of every pixel of an `out_h` x `out_w` image from one image's logits (NHWC, the
/// network's input size): the `content_h` x `content_w` region the image covers, resized to the
/// output with bilinear align_corners=True (as DeepLab resizes logits), then argmax. Row by
/// row, so a large image never holds full-size logits.
pub fn label_map(logits: &Activations, content_h: usize, content_w: usize, out_h: usize, out_w: usize) -> Vec<u16> {
    use rayon::prelude::*;
    let k = logits.c;
    let (ys, xs) = (align_corners_taps(content_h, out_h), align_corners_taps(content_w, out_w));
    let at = |y: usize, x: usize| &logits.data[(y * logits.w + x) * k..][..k];
    let mut out = vec![0u16; out_h * out_w];
    out.par_chunks_mut(out_w).enumerate().for_each(|(oy, row)| {
        let (y0, y1, ly) = ys[oy];
        let mut v = vec![0f32; k];
        for (ox, &(x0, x1, lx)) in xs.iter().enumerate() {
            let (a, b, c, d) = (at(y0, x0), at(y0, x1), at(y1, x0), at(y1, x1));
            for ch in 0..k {
                v[ch] = (1.0 - ly) * ((1.0 - lx) * a[ch] + lx * b[ch]) + ly * ((1.0 - lx) * c[ch] + lx * d[ch]);
            }
            row[ox] = argmax(&v) as u16;
        }
    });
    out
}

/// DeepLab's multi-scale (and flipped) evaluation: per scale, the image resized by the scale
/// (Pillow bilinear) is fitted into round(size * scale) and run by `run`, its logits resized to the
/// image (align corners) and softmaxed; with `flip` its mirror image too; the class of each pixel
/// is the argmax of the averaged probabilities. One scale 1.0 without flip gives [`label_map`]'s
/// answer (softmax keeps the argmax).
pub fn label_map_multiscale(
    img: &RgbImage,
    size: usize,
    scales: &[f64],
    flip: bool,
    mut run: impl FnMut(&[f32], usize) -> Result<Activations>,
) -> Result<Vec<u16>> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut acc: Vec<f32> = Vec::new();
    let mut classes = 0;
    for &scale in scales {
        let (sw, sh) = (((w as f64 * scale).round() as u32).max(1), ((h as f64 * scale).round() as u32).max(1));
        let scaled = if (sw as usize, sh as usize) == (w, h) { img.clone() } else { pil_resize(img, sw, sh, Resize::Bilinear) };
        let input_size = ((size as f64 * scale).round() as usize).max(1);
        for mirrored in [false, true].into_iter().take(if flip { 2 } else { 1 }) {
            let src = if mirrored { image::imageops::flip_horizontal(&scaled) } else { scaled.clone() };
            let fitted = fit(&src, input_size);
            let logits = run(&fitted.data, input_size)?;
            let k = logits.c;
            if acc.is_empty() {
                classes = k;
                acc = vec![0f32; w * h * k];
            }
            let (ys, xs) = (align_corners_taps(fitted.content_h, h), align_corners_taps(fitted.content_w, w));
            let at = |y: usize, x: usize| &logits.data[(y * logits.w + x) * k..][..k];
            let mut v = vec![0f32; k];
            for (oy, &(y0, y1, ly)) in ys.iter().enumerate() {
                for (ox, &(x0, x1, lx)) in xs.iter().enumerate() {
                    let (a, b, c, d) = (at(y0, x0), at(y0, x1), at(y1, x0), at(y1, x1));
                    for ch in 0..k {
                        v[ch] = (1.0 - ly) * ((1.0 - lx) * a[ch] + lx * b[ch]) + ly * ((1.0 - lx) * c[ch] + lx * d[ch]);
                    }
                    let max = v.iter().fold(f32::MIN, |m, &x| m.max(x));
                    let sum: f32 = v.iter().map(|&x| (x - max).exp()).sum();
                    let out_x = if mirrored { w - 1 - ox } else { ox };
                    let dst = &mut acc[(oy * w + out_x) * k..][..k];
                    for ch in 0..k {
                        dst[ch] += (v[ch] - max).exp() / sum;
                    }
                }
            }
        }
    }
    Ok(acc.chunks(classes.max(1)).map(|p| argmax(p) as u16).collect())
}

fn argmax(v: &[f32]) -> usize {
    (1..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best })
}

/// Fraction of the pixels in each class.
pub fn class_fractions(mask: &[u16], classes: usize) -> Vec<f64> {
    let mut counts = vec![0u64; classes];
    for &m in mask {
        counts[m as usize] += 1;
    }
    counts.iter().map(|&c| c as f64 / mask.len().max(1) as f64).collect()
}

/// The PASCAL VOC colour map (class i's colour spreads i's bits over the high bits of R, G, B).
pub fn voc_palette() -> [[u8; 3]; 256] {
    let mut palette = [[0u8; 3]; 256];
    for (i, colour) in palette.iter_mut().enumerate() {
        let mut id = i;
        for j in 0..8 {
            for (c, channel) in colour.iter_mut().enumerate() {
                *channel |= (((id >> c) & 1) as u8) << (7 - j);
            }
            id >>= 3;
        }
    }
    palette
}

/// The mask as an 8-bit palette PNG (pixel value = class index), as VOC's SegmentationClass files.
pub fn write_mask_png(path: &Path, mask: &[u16], width: usize, height: usize, palette: &[[u8; 3]; 256]) -> Result<()> {
    let bytes = encode_mask_png(mask, width, height, palette).map_err(|e| Error::file(path, e))?;
    crate::atomic::write(path, &bytes)
}

/// [`write_mask_png`]'s bytes, in memory.
pub fn encode_mask_png(mask: &[u16], width: usize, height: usize, palette: &[[u8; 3]; 256]) -> std::result::Result<Vec<u8>, String> {
    if let Some(&m) = mask.iter().find(|&&m| m > 255) {
        return Err(format!("class {m} does not fit an 8-bit palette mask (at most 256 classes)"));
    }
    let pixels: Vec<u8> = mask.iter().map(|&m| m as u8).collect();
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width as u32, height as u32);
    encoder.set_color(png::ColorType::Indexed);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_palette(palette.iter().flatten().copied().collect::<Vec<u8>>());
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(&pixels).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    Ok(out)
}

/// The image with each pixel's class colour blended in (`alpha` of the colour; background,
/// class 0, left as it is).
pub fn overlay(img: &RgbImage, mask: &[u16], palette: &[[u8; 3]; 256], alpha: f32) -> RgbImage {
    let mut out = img.clone();
    for (px, &m) in out.pixels_mut().zip(mask) {
        if m == 0 {
            continue;
        }
        let colour = palette[(m as usize).min(255)];
        for (v, &c) in px.0.iter_mut().zip(&colour) {
            *v = ((1.0 - alpha) * *v as f32 + alpha * c as f32).round() as u8;
        }
    }
    out
}

pub fn write_png(path: &Path, img: &RgbImage) -> Result<()> {
    crate::atomic::write_with(path, |f| {
        img.write_to(f, image::ImageFormat::Png).map_err(std::io::Error::other)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voc_palette_has_the_published_colours() {
        let p = voc_palette();
        assert_eq!(p[0], [0, 0, 0]);
        assert_eq!(p[1], [128, 0, 0]);
        assert_eq!(p[2], [0, 128, 0]);
        assert_eq!(p[15], [192, 128, 128]); // person
        assert_eq!(p[20], [0, 64, 128]); // tvmonitor
        assert_eq!(p[255], [224, 224, 192]); // the ignore label's border colour
    }

    #[test]
    fn fit_shrinks_the_long_side_and_pads_with_the_mean() {
        let img = RgbImage::from_pixel(40, 20, image::Rgb([255, 0, 127]));
        let f = fit(&img, 16);
        assert_eq!((f.content_w, f.content_h), (16, 8));
        assert_eq!(&f.data[..3], &[1.0, -1.0, 127.0 / 127.5 - 1.0]);
        assert!(f.data[(8 * 16) * 3..].iter().all(|&v| v == 0.0), "padding rows are the mean pixel");
        let small = fit(&RgbImage::new(5, 7), 16);
        assert_eq!((small.content_w, small.content_h), (5, 7), "small images are not enlarged");
    }

    /// A stand-in network: class 0 scores the red channel, class 1 its negative, at the input's
    /// own resolution.
    fn red_detector(data: &[f32], size: usize) -> Result<Activations> {
        let out: Vec<f32> = data.chunks(3).flat_map(|px| [px[0], -px[0]]).collect();
        Ok(Activations { n: 1, h: size, w: size, c: 2, data: out })
    }

    #[test]
    fn multiscale_and_flip_keep_what_one_pass_sees() {
        // Red on the left 20 columns of 48, blue on the right.
        let img = RgbImage::from_fn(48, 30, |x, _| if x < 20 { image::Rgb([255, 0, 0]) } else { image::Rgb([0, 0, 255]) });
        let single = {
            let f = fit(&img, 48);
            label_map(&red_detector(&f.data, 48).unwrap(), f.content_h, f.content_w, 30, 48)
        };
        assert_eq!(label_map_multiscale(&img, 48, &[1.0], false, red_detector).unwrap(), single);
        let flipped = label_map_multiscale(&img, 48, &[1.0], true, red_detector).unwrap();
        assert_eq!(flipped, single, "mirroring the input and the output back changes nothing here");
        let multi = label_map_multiscale(&img, 48, &[0.5, 1.0, 1.5], true, red_detector).unwrap();
        let differ: Vec<usize> = (0..multi.len()).filter(|&i| multi[i] != single[i]).map(|i| i % 48).collect();
        assert!(differ.iter().all(|&x| (18..=21).contains(&x)), "only the boundary may move: columns {differ:?}");
        assert_eq!((single[0], single[47]), (0, 1), "red pixels are class 0, blue ones class 1");
    }

    #[test]
    fn label_map_resizes_with_corner_alignment() {
        // 2x2 logits of 2 classes: class 1 wins only at the bottom-right corner.
        let logits = Activations { n: 1, h: 2, w: 2, c: 2, data: vec![1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0] };
        let mask = label_map(&logits, 2, 2, 5, 5);
        // Output (y, x) samples (y/4, x/4): class 1 scores ly*lx against 1 - ly*lx.
        #[rustfmt::skip]
        let expected = [0, 0, 0, 0, 0,
                        0, 0, 0, 0, 0,
                        0, 0, 0, 0, 0,
                        0, 0, 0, 1, 1,
                        0, 0, 0, 1, 1];
        assert_eq!(mask, expected);
        assert_eq!(class_fractions(&mask, 2), vec![21.0 / 25.0, 4.0 / 25.0]);
    }
}
