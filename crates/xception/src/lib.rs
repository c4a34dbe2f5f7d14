//! Xception (Chollet, CVPR 2017) and the DeepLab aligned Xception family, exact against Keras
//! and timm.
//!
//! The architecture is data ([`arch::Network`], from the `xception-arch` crate); [`model::Xception`]
//! runs it on burn; [`weights`] reads and writes the weight files.

pub mod atomic;
pub mod data;
pub mod device;
pub mod train_ops;
pub mod fit;
pub mod keras;
pub mod labels;
pub mod model;
pub mod npy;
pub mod pipeline;
pub mod rmsprop_tf;
pub mod preprocess;
pub mod runner;
pub mod segdata;
pub mod segment;
pub mod tf;
pub mod train;
pub mod weights;
pub mod zoo;

pub use labels::Labels;
pub use model::{Layout, Outputs, Prediction, Xception};
pub use preprocess::{Item, Preprocess, Resize};
pub use runner::{Backend, Runner};
pub use weights::{HostTensor, TensorMap};
pub use xception_arch::{self as arch, Error, ModelConfig, Network, Pooling, Result, Variant};
pub use xception_engine::{self as engine, Engine, Precision};
pub(crate) use xception_arch::error;
