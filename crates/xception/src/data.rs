//! Labelled image sets: ImageFolder trees (a folder per class, optionally under train/ and
//! val/ or test/), CSV lists (path,label, as Kaggle sets come) and IDX files (the MNIST /
//! Fashion-MNIST layout, optionally gzipped), with a seeded stratified split.

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One labelled image: a file, or (IDX sets) pixels in memory, `path` then naming them.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub path: PathBuf,
    pub label: usize,
    pub pixels: Option<std::sync::Arc<image::GrayImage>>,
}

impl Sample {
    /// The image as RGB (grey replicated, as Pillow's convert('RGB')).
    pub fn load(&self) -> Result<image::RgbImage> {
        match &self.pixels {
            Some(grey) => Ok(image::DynamicImage::ImageLuma8((**grey).clone()).to_rgb8()),
            None => crate::preprocess::load_image(&self.path),
        }
    }
}

/// Images and their class names (index = label).
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub classes: Vec<String>,
    pub samples: Vec<Sample>,
}

/// What `--data` names: one set (to be split) or a tree that is already split.
pub enum Data {
    One(Dataset),
    Split { train: Dataset, val: Dataset },
}

const IMAGE_EXTENSIONS: [&str; 6] = ["jpg", "jpeg", "png", "webp", "JPG", "PNG"];

fn is_image(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e) || e.eq_ignore_ascii_case("jpeg"))
}

/// Sub-directories of `dir`, sorted.
fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    out.sort();
    Ok(out)
}

/// Opens `path`: a CSV file, a folder of class folders, one with train/ and val/ (or test/), or
/// a folder of IDX files (train-images-idx3-ubyte[.gz] and its labels, t10k-* as the test split).
pub fn open(path: &Path) -> Result<Data> {
    if let Some(train) = idx_pair(path, "train") {
        let train = read_idx(&train.0, &train.1)?;
        return Ok(match idx_pair(path, "t10k") {
            Some(test) => Data::Split { val: read_idx(&test.0, &test.1)?, train },
            None => Data::One(train),
        });
    }
    if path.is_file() {
        return Ok(Data::One(read_csv(path)?));
    }
    if !path.is_dir() {
        return Err(Error::file(path, "no such file or directory (expected a CSV file or an image folder)"));
    }
    let train = path.join("train");
    let val = ["val", "valid", "validation", "test"].iter().map(|v| path.join(v)).find(|p| p.is_dir());
    if let (true, Some(val)) = (train.is_dir(), val) {
        let train = image_folder(&train, None)?;
        let val = image_folder(&val, Some(&train.classes))?;
        return Ok(Data::Split { train, val });
    }
    Ok(Data::One(image_folder(path, None)?))
}

/// A folder of class folders. With `classes`, the folder must hold exactly those (a val/ split).
pub fn image_folder(dir: &Path, classes: Option<&[String]>) -> Result<Dataset> {
    let folders = subdirs(dir)?;
    let names: Vec<String> = folders.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    if folders.is_empty() {
        return Err(Error::file(dir, "holds no class folders (expected one folder of images per class)"));
    }
    if let Some(expected) = classes {
        if names != expected {
            return Err(Error::file(dir, format!("has classes {names:?}, the training split has {expected:?}")));
        }
    }
    let mut samples = Vec::new();
    for (label, folder) in folders.iter().enumerate() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
            .map_err(|e| Error::io(folder, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_image(p))
            .collect();
        if files.is_empty() {
            return Err(Error::file(folder, "class folder holds no images (.jpg, .png, .webp)"));
        }
        files.sort();
        samples.extend(files.into_iter().map(|path| Sample { path, label, pixels: None }));
    }
    Ok(Dataset { classes: names, samples })
}

/// `path,label` lines; a first line whose path is not a file is a header. Paths are relative to
/// the CSV's folder. Classes are the distinct labels, in numeric order when all are numbers.
pub fn read_csv(file: &Path) -> Result<Dataset> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (path, label) = line
            .rsplit_once(',')
            .map(|(p, l)| (p.trim().trim_matches('"'), l.trim().trim_matches('"')))
            .ok_or_else(|| Error::file(file, format!("line {}: expected 'path,label', got '{line}'", i + 1)))?;
        let full = base.join(path);
        if rows.is_empty() && i == 0 && !full.is_file() {
            continue; // header
        }
        if !full.is_file() {
            return Err(Error::file(file, format!("line {}: image '{}' does not exist", i + 1, full.display())));
        }
        if label.is_empty() {
            return Err(Error::file(file, format!("line {}: empty label", i + 1)));
        }
        rows.push((full, label.to_string()));
    }
    if rows.is_empty() {
        return Err(Error::file(file, "lists no images"));
    }
    let mut classes: Vec<String> = rows.iter().map(|(_, l)| l.clone()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    if classes.iter().all(|c| c.parse::<f64>().is_ok()) {
        classes.sort_by(|a, b| a.parse::<f64>().unwrap().total_cmp(&b.parse::<f64>().unwrap()));
    }
    let index: BTreeMap<&str, usize> = classes.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
    let samples = rows.iter().map(|(path, l)| Sample { path: path.clone(), label: index[l.as_str()], pixels: None }).collect();
    Ok(Dataset { classes, samples })
}

/// `<prefix>-images-idx3-ubyte[.gz]` and `<prefix>-labels-idx1-ubyte[.gz]` in `dir`, if both exist.
fn idx_pair(dir: &Path, prefix: &str) -> Option<(PathBuf, PathBuf)> {
    let find = |kind: &str| ["", ".gz"].iter().map(|ext| dir.join(format!("{prefix}-{kind}{ext}"))).find(|p| p.is_file());
    Some((find("images-idx3-ubyte")?, find("labels-idx1-ubyte")?))
}

/// An IDX file's bytes (gunzipped when the name ends in .gz).
fn idx_bytes(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&raw[..]), &mut out).map_err(|e| Error::file(path, format!("not a valid gzip file: {e}")))?;
        return Ok(out);
    }
    Ok(raw)
}

/// An IDX image file (magic 0x00000803: count, rows, columns, then u8 pixels) and its label file
/// (0x00000801: count, then u8 labels). Classes are the label values 0..=max, named by number.
pub fn read_idx(images: &Path, labels: &Path) -> Result<Dataset> {
    let (img, lab) = (idx_bytes(images)?, idx_bytes(labels)?);
    let be = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    if img.len() < 16 || be(&img, 0) != 0x803 {
        return Err(Error::file(images, "not an IDX image file (magic 0x00000803 expected)"));
    }
    if lab.len() < 8 || be(&lab, 0) != 0x801 {
        return Err(Error::file(labels, "not an IDX label file (magic 0x00000801 expected)"));
    }
    let (n, rows, cols) = (be(&img, 4), be(&img, 8), be(&img, 12));
    if rows == 0 || cols == 0 || img.len() != 16 + n * rows * cols {
        return Err(Error::file(images, format!("declares {n} images of {rows}x{cols} but holds {} bytes (truncated?)", img.len())));
    }
    if be(&lab, 4) != n || lab.len() != 8 + n {
        return Err(Error::file(labels, format!("holds {} labels for {n} images", be(&lab, 4))));
    }
    let classes = lab[8..].iter().copied().max().map_or(0, |m| m as usize + 1);
    let name = images.display().to_string();
    let samples = (0..n)
        .map(|i| {
            let pixels = img[16 + i * rows * cols..][..rows * cols].to_vec();
            let grey = image::GrayImage::from_raw(cols as u32, rows as u32, pixels).expect("sized above");
            Sample { path: PathBuf::from(format!("{name}#{i}")), label: lab[8 + i] as usize, pixels: Some(std::sync::Arc::new(grey)) }
        })
        .collect();
    Ok(Dataset { classes: (0..classes).map(|c| c.to_string()).collect(), samples })
}

/// splitmix64: the seeded stream behind every shuffle (the same on every platform).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), 53 bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u = 1.0 - self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * self.uniform()).cos()
    }

    /// Fisher-Yates.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

impl Dataset {
    /// A stratified split: `fraction` of each class (at least one image when the class has two)
    /// goes to the second part, chosen by a seeded shuffle.
    pub fn split(&self, fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        if !(0.0..1.0).contains(&fraction) || fraction == 0.0 {
            return Err(Error::Config(format!("split fraction {fraction} is not in (0, 1)")));
        }
        let mut rng = Rng(seed);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for class in 0..self.classes.len() {
            let mut members: Vec<&Sample> = self.samples.iter().filter(|s| s.label == class).collect();
            rng.shuffle(&mut members);
            let n_b = if members.len() >= 2 { ((members.len() as f64 * fraction).round() as usize).clamp(1, members.len() - 1) } else { 0 };
            b.extend(members[..n_b].iter().map(|s| (*s).clone()));
            a.extend(members[n_b..].iter().map(|s| (*s).clone()));
        }
        let keep = |samples| Dataset { classes: self.classes.clone(), samples };
        Ok((keep(a), keep(b)))
    }

    /// Images per class.
    pub fn counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.classes.len()];
        for s in &self.samples {
            c[s.label] += 1;
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xception-data-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    #[test]
    fn image_folders_csv_and_splits() {
        let dir = tree("folders");
        for (class, n) in [("cat", 5), ("dog", 3)] {
            for i in 0..n {
                touch(&dir.join(format!("all/{class}/{i}.jpg")));
                touch(&dir.join(format!("split/train/{class}/{i}.png")));
            }
            touch(&dir.join(format!("split/val/{class}/v.jpg")));
        }
        touch(&dir.join("all/cat/notes.txt"));
        let Data::One(all) = open(&dir.join("all")).unwrap() else { panic!("one set") };
        assert_eq!(all.classes, ["cat", "dog"]);
        assert_eq!(all.counts(), [5, 3], "non-images are skipped");
        let (train, val) = all.split(0.34, 7).unwrap();
        assert_eq!((train.counts(), val.counts()), (vec![3, 2], vec![2, 1]));
        assert_eq!(all.split(0.34, 7).unwrap().1, val, "seeded");
        let Data::Split { train, val } = open(&dir.join("split")).unwrap() else { panic!("split tree") };
        assert_eq!((train.samples.len(), val.samples.len()), (8, 2));

        std::fs::write(dir.join("all/list.csv"), "file,label\ncat/0.jpg,1.0\ndog/0.jpg,0.333\ncat/1.jpg,10\n").unwrap();
        let csv = read_csv(&dir.join("all/list.csv")).unwrap();
        assert_eq!(csv.classes, ["0.333", "1.0", "10"], "numeric labels in numeric order");
        assert_eq!(csv.samples.iter().map(|s| s.label).collect::<Vec<_>>(), [1, 0, 2]);

        std::fs::write(dir.join("all/bad.csv"), "cat/0.jpg,a\ncat/missing.jpg,b\n").unwrap();
        let err = read_csv(&dir.join("all/bad.csv")).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("missing.jpg"), "{err}");
        std::fs::create_dir_all(dir.join("empty/cls")).unwrap();
        assert!(open(&dir.join("empty")).err().unwrap().to_string().contains("holds no images"));
        assert!(open(&dir.join("nowhere")).err().unwrap().to_string().contains("nowhere"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn idx_files_plain_and_gzipped() {
        let dir = tree("idx");
        // Three 2x3 images labelled 2, 0, 1; the test split gzipped.
        let mut images = vec![0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 3];
        images.extend((0..18u8).map(|v| v * 10));
        let labels = vec![0, 0, 8, 1, 0, 0, 0, 3, 2, 0, 1];
        std::fs::write(dir.join("train-images-idx3-ubyte"), &images).unwrap();
        std::fs::write(dir.join("train-labels-idx1-ubyte"), &labels).unwrap();
        for (name, bytes) in [("t10k-images-idx3-ubyte.gz", &images), ("t10k-labels-idx1-ubyte.gz", &labels)] {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            std::io::Write::write_all(&mut gz, bytes).unwrap();
            std::fs::write(dir.join(name), gz.finish().unwrap()).unwrap();
        }
        let Data::Split { train, val } = open(&dir).unwrap() else { panic!("train and t10k") };
        assert_eq!(train.classes, ["0", "1", "2"]);
        assert_eq!(train.samples.iter().map(|s| s.label).collect::<Vec<_>>(), [2, 0, 1]);
        let content = |d: &Dataset| d.samples.iter().map(|s| (s.label, s.pixels.clone())).collect::<Vec<_>>();
        assert_eq!(content(&val), content(&train), "the gzipped copy reads the same");
        let rgb = train.samples[1].load().unwrap();
        assert_eq!((rgb.width(), rgb.height()), (3, 2));
        assert_eq!(rgb.get_pixel(1, 0).0, [70, 70, 70], "grey replicated to RGB");
        std::fs::write(dir.join("train-images-idx3-ubyte"), &images[..20]).unwrap();
        assert!(open(&dir).err().unwrap().to_string().contains("truncated"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
