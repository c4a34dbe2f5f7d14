//! Segmentation data: the PASCAL VOC layout (JPEGImages/, SegmentationClass/ palette PNGs,
//! ImageSets/Segmentation/<split>.txt) and Cityscapes-style trees (leftImg8bit/<split>/<city>/
//! *_leftImg8bit.png with gtFine/<split>/<city>/*_gtFine_labelTrainIds.png). Masks are read as
//! class indices, 255 = ignore; the mean IoU is accumulated over a pixel confusion matrix.

use crate::data::Rng;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The label value that is never scored (VOC's object borders, Cityscapes' void).
pub const IGNORE: u8 = 255;

#[derive(Clone, Debug, PartialEq)]
pub struct SegSample {
    pub image: PathBuf,
    pub mask: PathBuf,
}

impl SegSample {
    /// The image and its mask's class indices (row-major, at the image's size); a mask of another
    /// size than its image is refused naming both.
    pub fn load(&self) -> Result<(image::RgbImage, Vec<u8>)> {
        let img = crate::preprocess::load_image(&self.image)?;
        let (w, h, mask) = read_mask(&self.mask)?;
        if (w, h) != (img.width(), img.height()) {
            return Err(Error::Shape(format!("{} is {w}x{h} but its image {} is {}x{}", self.mask.display(), self.image.display(), img.width(), img.height())));
        }
        Ok((img, mask))
    }
}

/// The samples of `split` under `root`, whichever layout it has.
pub fn open(root: &Path, split: &str) -> Result<Vec<SegSample>> {
    if root.join("ImageSets/Segmentation").is_dir() {
        open_voc(root, split)
    } else if root.join("leftImg8bit").is_dir() {
        open_cityscapes(root, split)
    } else {
        Err(Error::file(root, "is neither a VOC tree (ImageSets/Segmentation, JPEGImages, SegmentationClass) nor a Cityscapes one (leftImg8bit, gtFine)"))
    }
}

pub fn open_voc(root: &Path, split: &str) -> Result<Vec<SegSample>> {
    let list = root.join(format!("ImageSets/Segmentation/{split}.txt"));
    let text = std::fs::read_to_string(&list).map_err(|e| Error::io(&list, e))?;
    let mut out = Vec::new();
    for (i, id) in text.lines().map(str::trim).filter(|l| !l.is_empty()).enumerate() {
        let image = ["jpg", "jpeg", "png"].iter().map(|e| root.join(format!("JPEGImages/{id}.{e}"))).find(|p| p.is_file());
        let image = image.ok_or_else(|| Error::file(&list, format!("line {}: no image JPEGImages/{id}.jpg", i + 1)))?;
        let mask = root.join(format!("SegmentationClass/{id}.png"));
        if !mask.is_file() {
            return Err(Error::file(&list, format!("line {}: no mask {}", i + 1, mask.display())));
        }
        out.push(SegSample { image, mask });
    }
    if out.is_empty() {
        return Err(Error::file(&list, "lists no images"));
    }
    Ok(out)
}

pub fn open_cityscapes(root: &Path, split: &str) -> Result<Vec<SegSample>> {
    let images = root.join("leftImg8bit").join(split);
    let mut out = Vec::new();
    let mut cities: Vec<PathBuf> = std::fs::read_dir(&images).map_err(|e| Error::io(&images, e))?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect();
    cities.sort();
    for city in cities {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&city).map_err(|e| Error::io(&city, e))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for image in files {
            let name = image.file_name().unwrap().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix("_leftImg8bit.png") else { continue };
            let mask = root.join("gtFine").join(split).join(city.file_name().unwrap()).join(format!("{stem}_gtFine_labelTrainIds.png"));
            if !mask.is_file() {
                return Err(Error::file(&image, format!("has no label image {}", mask.display())));
            }
            out.push(SegSample { image, mask });
        }
    }
    if out.is_empty() {
        return Err(Error::file(&images, "holds no *_leftImg8bit.png images"));
    }
    Ok(out)
}

/// A label image's class indices: a palette PNG's indices (VOC), or an 8-bit grey PNG's values
/// (Cityscapes trainIds). Returns (width, height, indices).
pub fn read_mask(path: &Path) -> Result<(u32, u32, Vec<u8>)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let mut reader = decoder.read_info().map_err(|e| Error::file(path, format!("not a PNG label image: {e}")))?;
    let info = reader.info();
    let (w, h, colour, depth) = (info.width, info.height, info.color_type, info.bit_depth);
    if !matches!(colour, png::ColorType::Indexed | png::ColorType::Grayscale) || depth != png::BitDepth::Eight {
        return Err(Error::file(path, format!("label image is {colour:?} {depth:?}; expected an 8-bit palette or grey PNG whose values are class indices")));
    }
    let mut buf = vec![0u8; reader.output_buffer_size().ok_or_else(|| Error::file(path, "label image too large"))?];
    let frame = reader.next_frame(&mut buf).map_err(|e| Error::file(path, format!("cannot decode label image: {e}")))?;
    buf.truncate(frame.buffer_size());
    Ok((w, h, buf))
}

/// A pixel confusion matrix over `classes` (rows: truth, columns: prediction).
pub struct Confusion {
    pub classes: usize,
    pub counts: Vec<u64>,
}

impl Confusion {
    pub fn new(classes: usize) -> Confusion {
        Confusion { classes, counts: vec![0; classes * classes] }
    }

    /// Adds one image. `truth` values are classes or [`IGNORE`]; anything else is an error
    /// naming `mask`.
    pub fn add(&mut self, truth: &[u8], predicted: &[u16], mask: &Path) -> Result<()> {
        if truth.len() != predicted.len() {
            return Err(Error::file(mask, format!("mask has {} pixels, the prediction {}", truth.len(), predicted.len())));
        }
        for (&t, &p) in truth.iter().zip(predicted) {
            if t == IGNORE {
                continue;
            }
            if t as usize >= self.classes {
                return Err(Error::file(mask, format!("holds class value {t}, but the model has {} classes (0..{}, 255 = ignore)", self.classes, self.classes - 1)));
            }
            self.counts[t as usize * self.classes + p as usize] += 1;
        }
        Ok(())
    }

    /// IoU per class: TP / (TP + FP + FN); None for a class absent from truth and prediction.
    pub fn iou(&self) -> Vec<Option<f64>> {
        let k = self.classes;
        (0..k)
            .map(|c| {
                let tp = self.counts[c * k + c];
                let row: u64 = self.counts[c * k..(c + 1) * k].iter().sum();
                let col: u64 = (0..k).map(|r| self.counts[r * k + c]).sum();
                let union = row + col - tp;
                (union > 0).then(|| tp as f64 / union as f64)
            })
            .collect()
    }

    /// Mean over the classes that appear (as PASCAL's and DeepLab's evaluation count).
    pub fn mean_iou(&self) -> f64 {
        let present: Vec<f64> = self.iou().into_iter().flatten().collect();
        present.iter().sum::<f64>() / present.len().max(1) as f64
    }

    /// matrix[true][predicted]
    pub fn matrix(&self) -> Vec<Vec<usize>> {
        self.counts.chunks(self.classes).map(|r| r.iter().map(|&v| v as usize).collect()).collect()
    }

    pub fn pixel_accuracy(&self) -> f64 {
        let total: u64 = self.counts.iter().sum();
        let right: u64 = (0..self.classes).map(|c| self.counts[c * self.classes + c]).sum();
        right as f64 / total.max(1) as f64
    }
}

/// Class names of the synthetic set.
pub const SYNTHETIC_CLASSES: [&str; 4] = ["background", "disc", "square", "triangle"];

/// Writes a seeded synthetic VOC-layout set: textured backgrounds with 1-3 discs, squares and
/// triangles of varied sizes and colours, a 1-pixel ignore (255) border around each shape as VOC
/// draws, palette masks, and `train.txt` / `val.txt` (every 5th image is val).
pub fn synthetic_voc(root: &Path, count: usize, size: u32, seed: u64) -> Result<()> {
    let dirs = ["JPEGImages", "SegmentationClass", "ImageSets/Segmentation"];
    for d in dirs {
        std::fs::create_dir_all(root.join(d)).map_err(|e| Error::io(root.join(d), e))?;
    }
    let mut rng = Rng(seed);
    let mut unit = move || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let palette = crate::segment::voc_palette();
    let (mut train, mut val) = (String::new(), String::new());
    for i in 0..count {
        let id = format!("{i:05}");
        let (tint, freq) = ([unit(), unit(), unit()], 0.05 + 0.3 * unit());
        let mut img = image::RgbImage::from_fn(size, size, |x, y| {
            let wave = ((x as f64 * freq).sin() * (y as f64 * freq * 0.7).cos() + 1.0) / 2.0;
            let px = |c: usize| (60.0 + 120.0 * tint[c] * wave) as u8;
            image::Rgb([px(0), px(1), px(2)])
        });
        let mut mask = vec![0u8; (size * size) as usize];
        for _ in 0..1 + (unit() * 3.0) as usize {
            let class = 1 + (unit() * 3.0) as u8;
            let r = size as f64 * (0.08 + 0.2 * unit());
            let (cx, cy) = (r + unit() * (size as f64 - 2.0 * r), r + unit() * (size as f64 - 2.0 * r));
            let colour = image::Rgb([(40.0 + 215.0 * unit()) as u8, (40.0 + 215.0 * unit()) as u8, (40.0 + 215.0 * unit()) as u8]);
            let inside = |x: f64, y: f64| -> bool {
                let (dx, dy) = (x - cx, y - cy);
                match class {
                    1 => dx * dx + dy * dy <= r * r,
                    2 => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
                    _ => dy <= r * 0.8 && dy >= -r + 1.8 * dx.abs(),
                }
            };
            for y in 0..size {
                for x in 0..size {
                    let (fx, fy) = (x as f64 + 0.5, y as f64 + 0.5);
                    let at = (y * size + x) as usize;
                    if inside(fx, fy) {
                        img.put_pixel(x, y, colour);
                        mask[at] = class;
                    } else if [(-1.0, 0.0), (1.0, 0.0), (0.0, -1.0), (0.0, 1.0)].iter().any(|(ox, oy)| inside(fx + ox, fy + oy)) {
                        mask[at] = IGNORE; // the boundary band VOC leaves unscored
                    }
                }
            }
        }
        let image_path = root.join(format!("JPEGImages/{id}.jpg"));
        img.save(&image_path).map_err(|e| Error::file(&image_path, e.to_string()))?;
        crate::segment::write_mask_png(&root.join(format!("SegmentationClass/{id}.png")), &mask.iter().map(|&m| m as u16).collect::<Vec<_>>(), size as usize, size as usize, &palette)?;
        if i % 5 == 4 { &mut val } else { &mut train }.push_str(&format!("{id}\n"));
    }
    for (name, list) in [("train", train), ("val", val)] {
        let p = root.join(format!("ImageSets/Segmentation/{name}.txt"));
        std::fs::write(&p, list).map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_iou_counts_only_present_classes_and_skips_ignored_pixels() {
        let mut c = Confusion::new(3);
        // truth 0 0 1 1 255 ; prediction 0 1 1 1 2
        c.add(&[0, 0, 1, 1, IGNORE], &[0, 1, 1, 1, 2], Path::new("m.png")).unwrap();
        // class 0: tp 1, fn 1, fp 0 -> 1/2; class 1: tp 2, fp 1 -> 2/3; class 2 absent.
        assert_eq!(c.iou(), vec![Some(0.5), Some(2.0 / 3.0), None]);
        assert!((c.mean_iou() - (0.5 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        assert_eq!(c.pixel_accuracy(), 0.75);
        let err = c.add(&[7], &[0], Path::new("bad.png")).unwrap_err().to_string();
        assert!(err.contains("bad.png") && err.contains("class value 7"), "{err}");
        assert!(c.add(&[0, 0], &[0], Path::new("short.png")).unwrap_err().to_string().contains("short.png"));
    }

    #[test]
    fn synthetic_sets_open_as_voc_and_their_masks_read_back() {
        let dir = std::env::temp_dir().join(format!("xception-synth-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        synthetic_voc(&dir, 10, 33, 1).unwrap();
        let (train, val) = (open(&dir, "train").unwrap(), open(&dir, "val").unwrap());
        assert_eq!((train.len(), val.len()), (8, 2));
        let (w, h, m) = read_mask(&val[0].mask).unwrap();
        assert_eq!((w, h, m.len()), (33, 33, 33 * 33));
        assert!(m.iter().all(|&v| v < 4 || v == IGNORE));
        assert!(m.iter().any(|&v| v > 0 && v < 4), "a shape is drawn");
        std::fs::write(dir.join("ImageSets/Segmentation/broken.txt"), "00000\nmissing\n").unwrap();
        let err = open(&dir, "broken").unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("missing"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
