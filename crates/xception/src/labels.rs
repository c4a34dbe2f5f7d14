//! Class names for classifier outputs.

use crate::error::{Error, Result};
use std::path::Path;

const IMAGENET: &str = include_str!("../data/imagenet_labels.txt");

/// Names of the classes, in logit order.
#[derive(Clone, Debug)]
pub struct Labels {
    names: Vec<String>,
}

impl Labels {
    /// The 1000 ImageNet-1k classes (first WordNet lemma of each synset).
    pub fn imagenet() -> Labels {
        let names = IMAGENET
            .lines()
            .map(|l| l.split('\t').nth(1).unwrap_or(l).split(',').next().unwrap_or("").trim().to_string())
            .collect();
        Labels { names }
    }

    /// The 21 PASCAL VOC 2012 segmentation classes (background first).
    pub fn voc() -> Labels {
        const VOC: [&str; 21] = [
            "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
            "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
        ];
        Labels { names: VOC.iter().map(|s| s.to_string()).collect() }
    }

    pub fn from_names(names: Vec<String>) -> Labels {
        Labels { names }
    }

    /// No names: every class is called `class N`.
    pub fn numbered() -> Labels {
        Labels { names: Vec::new() }
    }

    /// One label per line, in class order.
    pub fn from_file(path: &Path) -> Result<Labels> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let names: Vec<String> = text.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
        if names.is_empty() {
            return Err(Error::file(path, "labels file holds no labels (expected one per line)"));
        }
        Ok(Labels { names })
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The name of class `index`, or `class N` past the end of the list.
    pub fn name(&self, index: usize) -> String {
        self.names.get(index).cloned().unwrap_or_else(|| format!("class {index}"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn imagenet_has_1000_names_in_index_order() {
        let l = super::Labels::imagenet();
        assert_eq!(l.len(), 1000);
        assert_eq!(l.name(0), "tench");
        assert_eq!(l.name(281), "tabby");
        assert_eq!(l.name(999), "toilet tissue");
    }
}
