//! Reading reference outputs from fixture files (shared by the conformance tests).

#![allow(dead_code)]

use safetensors::SafeTensors;

fn raw(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<u8>) {
    let v = st.tensor(name).unwrap_or_else(|e| panic!("fixture tensor {name}: {e}"));
    (v.shape().to_vec(), v.data().to_vec())
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn i64s(bytes: &[u8]) -> Vec<i64> {
    bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
}

/// A reference output: whole, or (for large tensors) a seeded sample of flat indices and values.
pub struct Reference {
    pub shape: Vec<usize>,
    pub index: Option<Vec<usize>>,
    pub values: Vec<f32>,
}

pub fn reference(st: &SafeTensors, name: &str) -> Reference {
    let names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    if names.iter().any(|n| n == name) {
        let (shape, bytes) = raw(st, name);
        Reference { shape, index: None, values: f32s(&bytes) }
    } else {
        let shape = i64s(&raw(st, &format!("{name}.shape")).1).into_iter().map(|d| d as usize).collect();
        let index = i64s(&raw(st, &format!("{name}.index")).1).into_iter().map(|i| i as usize).collect();
        Reference { shape, index: Some(index), values: f32s(&raw(st, &format!("{name}.values")).1) }
    }
}

/// max |ours - reference| / max |reference| over the stored elements.
pub fn relative_error(ours: &[f32], reference: &Reference) -> f32 {
    let picked: Vec<f32> = match &reference.index {
        Some(index) => index.iter().map(|&i| ours[i]).collect(),
        None => ours.to_vec(),
    };
    assert_eq!(picked.len(), reference.values.len());
    let scale = reference.values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = picked.iter().zip(&reference.values).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

