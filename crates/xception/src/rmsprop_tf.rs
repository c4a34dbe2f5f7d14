//! RMSprop as TensorFlow and Keras compute it, which burn's (PyTorch's form) cannot express: the
//! epsilon sits inside the square root, the learning rate multiplies the step before momentum
//! accumulates it, and weight decay is decoupled (Keras 3: `w -= lr * wd * w` before the step).
//!
//! velocity = rho * velocity + (1 - rho) * g^2
//! increment = lr * g / sqrt(velocity + epsilon)
//! momentum = mu * momentum + increment;  w -= momentum   (w -= increment when mu = 0)

use burn::optim::{LearningRate, Optimizer, RecordState, StateSink, StateSource};
use burn::tensor::{Device, Tensor};

#[derive(Clone, Debug)]
pub struct TfRmsProp {
    pub rho: f64,
    pub momentum: f64,
    pub epsilon: f64,
    pub weight_decay: f64,
}

#[derive(Clone)]
pub struct TfRmsPropState<const D: usize> {
    pub velocity: Tensor<D>,
    pub momentum: Tensor<D>,
}

// What `#[derive(RecordState)]` writes inside burn-optim (the derive names that crate's paths):
// both tensors under the parameter's prefix, so checkpoints carry the state.
impl<const D: usize> RecordState for TfRmsPropState<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        out.push_tensor(prefix, "velocity", self.velocity.to_data());
        out.push_tensor(prefix, "momentum", self.momentum.to_data());
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, device: &Device) -> Option<Self> {
        let velocity = Tensor::from_data(src.take_tensor(prefix, "velocity")?, device);
        let momentum = Tensor::from_data(src.take_tensor(prefix, "momentum")?, device);
        Some(TfRmsPropState { velocity, momentum })
    }
}

impl Optimizer for TfRmsProp {
    type State<const D: usize> = TfRmsPropState<D>;

    fn step<const D: usize>(&self, lr: LearningRate, tensor: Tensor<D>, grad: Tensor<D>, state: Option<Self::State<D>>) -> (Tensor<D>, Option<Self::State<D>>) {
        let tensor = if self.weight_decay > 0.0 { tensor.clone() - tensor * (lr * self.weight_decay) } else { tensor };
        let (velocity, momentum) = match state {
            Some(s) => (s.velocity, s.momentum),
            None => (grad.zeros_like(), grad.zeros_like()),
        };
        let velocity = velocity * self.rho + grad.clone().square() * (1.0 - self.rho);
        let increment = grad * lr / (velocity.clone() + self.epsilon).sqrt();
        let momentum = if self.momentum > 0.0 { momentum * self.momentum + increment } else { increment };
        (tensor - momentum.clone(), Some(TfRmsPropState { velocity, momentum }))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        TfRmsPropState { velocity: state.velocity.to_device(device), momentum: state.momentum.to_device(device) }
    }
}
