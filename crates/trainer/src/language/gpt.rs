//! The GPT: nanoGPT's character-level transformer. Token and learned position embeddings,
//! pre-LayerNorm blocks without biases (causal multi-head self-attention, then a GELU MLP four
//! times as wide), a final LayerNorm, and an output layer tied to the token embedding.
//!
//! The parameters are burn `Param`s (so checkpoints, the optimizer, mixed precision and the
//! weights hash treat it as any model); every layer runs the crate's own kernels, each a forward
//! and backward pair ([`crate::kernels`]). Shapes, with `B` windows of `T` tokens, width `C`,
//! vocabulary `V`: tokens `[B, T]` -> residual stream `[B*T, C]` -> logits `[B*T, V]`.

use burn::module::{Initializer, Param};
use burn::prelude::*;
use burn::tensor::DType;

use super::dropout::{self, Dropout};
use crate::kernels;
use crate::precision::{convert, round_activations};
use crate::settings::ModelSettings;

/// One transformer block's parameters; matrices are `[inputs, outputs]` (burn's `Linear`).
#[derive(Module, Debug)]
pub struct Block {
    /// LayerNorm gain before attention, `[C]`.
    ln1: Param<Tensor<1>>,
    /// Query, key and value projections side by side, `[C, 3C]`.
    qkv: Param<Tensor<2>>,
    /// Attention output projection, `[C, C]`.
    proj: Param<Tensor<2>>,
    /// LayerNorm gain before the MLP, `[C]`.
    ln2: Param<Tensor<1>>,
    /// MLP expansion, `[C, 4C]`.
    fc: Param<Tensor<2>>,
    /// MLP projection back to the residual stream, `[4C, C]`.
    fc_proj: Param<Tensor<2>>,
}

/// A character-level GPT.
#[derive(Module, Debug)]
pub struct Gpt {
    /// Token embedding `[V, C]`, also the output layer (tied).
    wte: Param<Tensor<2>>,
    /// Position embedding `[context, C]`.
    wpe: Param<Tensor<2>>,
    blocks: Vec<Block>,
    /// Final LayerNorm gain `[C]`.
    ln_f: Param<Tensor<1>>,
    #[module(skip)]
    heads: usize,
}

/// The standard deviation of nanoGPT's initialisation of every matrix.
const INIT_STD: f64 = 0.02;

impl Gpt {
    /// nanoGPT's initialisation: every matrix normal with std 0.02, the residual projections
    /// (`proj`, `fc_proj`) with 0.02 / sqrt(2 x layers), LayerNorm gains 1. Draws from the
    /// device's generator, which the trainer seeds.
    pub fn new(settings: &ModelSettings, vocabulary: usize, device: &Device) -> Self {
        let (width, layers) = (settings.width, settings.layers);
        let residual_std = INIT_STD / (2.0 * layers as f64).sqrt();
        let normal = |std: f64, shape: [usize; 2]| {
            Initializer::Normal { mean: 0.0, std }.init(shape, device)
        };
        let ones = || Initializer::Ones.init([width], device);
        let blocks = (0..layers)
            .map(|_| Block {
                ln1: ones(),
                qkv: normal(INIT_STD, [width, 3 * width]),
                proj: normal(residual_std, [width, width]),
                ln2: ones(),
                fc: normal(INIT_STD, [width, 4 * width]),
                fc_proj: normal(residual_std, [4 * width, width]),
            })
            .collect();
        Self {
            wte: normal(INIT_STD, [vocabulary, width]),
            wpe: normal(INIT_STD, [settings.context, width]),
            blocks,
            ln_f: ones(),
            heads: settings.heads,
        }
    }

    /// Tokens a window may hold.
    pub fn context(&self) -> usize {
        self.wpe.dims()[0]
    }

    /// Tokens the model knows.
    pub fn vocabulary(&self) -> usize {
        self.wte.dims()[0]
    }

    /// The next-token logits at every position of `tokens: [B, T]` (T at most the context):
    /// `[B*T, V]`, in the parameters' precision.
    pub fn logits(&self, tokens: Tensor<2, Int>) -> Tensor<2> {
        self.forward(tokens, None)
    }

    /// [`Gpt::logits`], with `dropout` in training.
    fn forward(&self, tokens: Tensor<2, Int>, dropout: Option<&Dropout>) -> Tensor<2> {
        let [batch, time] = tokens.dims();
        let width = self.wte.dims()[1];
        let mut x: Tensor<2> =
            kernels::embed(tokens, self.wte.val(), self.wpe.val()).reshape([batch * time, width]);
        if let Some(d) = dropout {
            x = d.apply(x, dropout::EMBEDDINGS);
        }
        for (layer, block) in self.blocks.iter().enumerate() {
            let sites = dropout.map(|d| (d, layer as u64));
            x = round_activations(block.forward(x, batch, self.heads, sites));
        }
        let h = kernels::layer_norm(x, self.ln_f.val());
        kernels::matmul(round_activations(h), self.wte.val().transpose())
    }

    /// The summed cross-entropy of the next-token predictions for `tokens: [B, T]` against
    /// `targets: [B, T]` (negative targets are ignored), divided by `divisor`: a `[1]` tensor.
    /// The softmax and the loss run in f32, whatever the parameters' precision.
    /// With `dropout`, as in training.
    pub fn loss(
        &self,
        tokens: Tensor<2, Int>,
        targets: Tensor<2, Int>,
        divisor: f32,
        dropout: Option<&Dropout>,
    ) -> Tensor<1> {
        let [batch, time] = targets.dims();
        let logits = convert(self.forward(tokens, dropout), DType::F32);
        kernels::cross_entropy(logits, targets.reshape([batch * time]), divisor)
    }
}

impl Block {
    /// `x + attention(ln1(x))`, then `+ mlp(ln2(...))`, on the residual stream `x: [B*T, C]`;
    /// with `dropout` for block `layer`, its attention probabilities and its two branches'
    /// outputs dropped, each at a site of its own.
    fn forward(
        &self,
        x: Tensor<2>,
        batch: usize,
        heads: usize,
        dropout: Option<(&Dropout, u64)>,
    ) -> Tensor<2> {
        let [rows, width] = x.dims();
        let time = rows / batch;
        let drop = |y: Tensor<2>, offset: u64| match dropout {
            Some((d, layer)) => d.apply(y, 1 + 2 * layer + offset),
            None => y,
        };
        let h = kernels::layer_norm(x.clone(), self.ln1.val());
        let qkv = kernels::matmul(h, self.qkv.val()).reshape([batch, time, 3 * width]);
        let attended = match dropout {
            Some((d, layer)) => {
                let site = dropout::ATTENTION_PROBABILITIES + layer;
                let mask = d.attention_mask(heads, time, site, &qkv.device());
                kernels::causal_attention_masked(qkv, mask, heads)
            }
            None => kernels::causal_attention(qkv, heads),
        }
        .reshape([rows, width]);
        let x = x + drop(
            kernels::matmul(round_activations(attended), self.proj.val()),
            0,
        );
        let h = kernels::layer_norm(x.clone(), self.ln2.val());
        let hidden = kernels::gelu(kernels::matmul(h, self.fc.val()));
        x + drop(
            kernels::matmul(round_activations(hidden), self.fc_proj.val()),
            1,
        )
    }
}

/// Parameters of a GPT of these settings over `vocabulary` tokens (the tied output layer counted
/// once), without building it.
pub fn parameter_count(settings: &ModelSettings, vocabulary: usize) -> Option<usize> {
    let (c, layers) = (settings.width, settings.layers);
    let per_block = c.checked_mul(c)?.checked_mul(12)?.checked_add(2 * c)?;
    per_block
        .checked_mul(layers)?
        .checked_add(vocabulary.checked_add(settings.context)?.checked_mul(c)?)?
        .checked_add(c)
}

/// f32 values a window's forward pass keeps for backward (the autodiff graph's activations),
/// roughly: per token and block, the LayerNorm inputs and outputs, q, k, v, the attention
/// output and probabilities, the MLP's two wide tensors; then the logits and their softmax.
pub fn activations_per_window(settings: &ModelSettings, vocabulary: usize) -> Option<usize> {
    let (c, t, layers) = (settings.width, settings.context, settings.layers);
    let per_token_block = c
        .checked_mul(16)?
        .checked_add(settings.heads.checked_mul(t)?)?;
    let per_token = per_token_block
        .checked_mul(layers)?
        .checked_add(vocabulary.checked_mul(3)?)?;
    per_token.checked_mul(t)
}
