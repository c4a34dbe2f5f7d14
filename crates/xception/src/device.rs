//! Which burn device runs the network.

use burn::tensor::Device;

/// The GPU when built with the `cuda` feature, otherwise burn's `flex` CPU backend.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    {
        Device::cuda(0)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Device::flex()
    }
}
