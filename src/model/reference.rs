//! The reference forward pass: stock candle ops on NCHW tensors.
//!
//! Straightforward on purpose: it is what faster CPU paths are tested against.

use candle_core::{Result, Tensor, D};

use super::weights::{BlockWeights, FasterNetWeights, FoldedConv};
use super::{Activation, ModelOutput};

pub fn forward(w: &FasterNetWeights, x: &Tensor) -> Result<ModelOutput> {
    let act = w.config.act;
    let mut x = conv_bias(x, &w.stem, 4)?;
    for stage in &w.stages {
        if let Some(ds) = &stage.downsample {
            x = conv_bias(&x, ds, 2)?;
        }
        for b in &stage.blocks {
            x = block(&x, b, act)?;
        }
    }
    let pooled = x.mean(D::Minus1)?.mean(D::Minus1)?; // (B, C)
    let head = w.conv_head.squeeze(3)?.squeeze(2)?; // (F, C)
    let features = activate(&pooled.matmul(&head.t()?)?, act)?;
    let logits = features.matmul(&w.classifier_weight.t()?)?.broadcast_add(&w.classifier_bias)?;
    Ok(ModelOutput { logits, features })
}

/// `x + fc2(act(fc1([pconv(x[:cp]), x[cp:]])))`, with fc1 applied to the two channel groups
/// separately so the convolved channels are never concatenated back into a full tensor.
fn block(x: &Tensor, b: &BlockWeights, act: Activation) -> Result<Tensor> {
    let dim = x.dim(1)?;
    let cp = b.partial_conv.dim(0)?;
    let mixed = x.narrow(1, 0, cp)?.conv2d(&b.partial_conv, 1, 1, 1, 1)?;
    let untouched = x.narrow(1, cp, dim - cp)?;
    let hidden = (mixed.conv2d(&b.fc1_mixed, 0, 1, 1, 1)?
        + untouched.conv2d(&b.fc1_untouched, 0, 1, 1, 1)?)?
    .broadcast_add(&b.fc1_bias.reshape((1, (), 1, 1))?)?;
    let hidden = activate(&hidden, act)?;
    x + hidden.conv2d(&b.fc2, 0, 1, 1, 1)?
}

fn conv_bias(x: &Tensor, conv: &FoldedConv, stride: usize) -> Result<Tensor> {
    x.conv2d(&conv.weight, 0, stride, 1, 1)?.broadcast_add(&conv.bias.reshape((1, (), 1, 1))?)
}

fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::Gelu => x.gelu_erf(),
        Activation::Relu => x.relu(),
    }
}
