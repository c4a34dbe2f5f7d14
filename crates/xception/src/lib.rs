//! Xception (Chollet, CVPR 2017) and the DeepLab aligned Xception family, exact against Keras
//! and timm.

pub use xception_arch::{self as arch, Error, ModelConfig, Network, Pooling, Result, Variant};
