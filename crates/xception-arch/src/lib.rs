//! The Xception family as data. Everything else in the workspace (burn modules, weight
//! import/export, the CPU engine, `xception info`) is driven by [`Network`].

pub mod arch;
pub mod deeplab;
pub mod error;
pub mod info;

pub use arch::{Activation, Block, Conv, Dense, DenseSpec, Family, ModelConfig, Network, Norm, Op, Padding, Pooling, Shortcut, TensorRole, TensorSpec, Variant};
pub use deeplab::{SegHead, Segmentation};
pub use error::{Error, Result};
pub use info::{FeatureInfo, NetworkInfo, Shape, StageInfo};
