//! Incremental decoding for the Llama family: each layer's rotated keys and values are kept
//! in a [`KvCache`], so the next token costs one token's forward pass over the cache instead
//! of the whole sequence's again. Inference only (no autodiff), on burn's ops, so every
//! backend runs it; the prompt goes through in one pass, causally masked.

use burn::tensor::activation::softmax;
use burn::tensor::{Tensor, TensorData};

use crate::llama::{Llama, LlamaLayer};

/// One sequence's keys (rotated) and values per layer, and how many positions they hold.
pub(crate) struct KvCache {
    /// Per layer: keys and values, `[1, kv_heads, len, head_dim]` each.
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    len: usize,
}

impl KvCache {
    pub(crate) fn new(model: &Llama) -> Self {
        Self {
            layers: vec![None; model.layers.len()],
            len: 0,
        }
    }

    /// Positions held: where the next token goes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Llama {
    /// Final hidden states of `ids`, the tokens at positions `cache.len()..` of one sequence,
    /// attending to the cache and causally to each other; their keys and values join the
    /// cache.
    ///
    /// # Shapes
    /// - output: `[1, ids.len(), hidden]`
    pub(crate) fn hidden_cached(&self, ids: &[u32], cache: &mut KvCache) -> Tensor<3> {
        let n = ids.len();
        let device = self.embed_tokens.weight.device();
        let input = crate::llama::one_row(ids, &device);
        let start = cache.len;
        let positions: Vec<u32> = (start as u32..(start + n) as u32).collect();
        let d = self.head_dim;
        let (cos, sin) = flywheel_kernels::attention::rope_tables(self.rope_theta, &positions, d);
        let table = |t: Vec<f32>| Tensor::<4>::from_data(TensorData::new(t, [1, 1, n, d]), &device);
        let rope = Rope {
            cos: table(cos),
            sin: table(sin),
        };
        // Query i (position start + i) sees keys 0..=start + i: only the new block needs a
        // mask, and a single token needs none.
        let mask = (n > 1).then(|| {
            let total = start + n;
            let mut bias = vec![0f32; n * total];
            for i in 0..n {
                bias[i * total + start + i + 1..(i + 1) * total].fill(-1.0e9);
            }
            Tensor::<4>::from_data(TensorData::new(bias, [1, 1, n, total]), &device)
        });
        // A first pass (the prompt) attends within itself alone: training's fused attention
        // serves it, and only the cache's copies of the keys are rotated here.
        let fused = (start == 0 && n > 1).then(|| {
            let heads = self
                .layers
                .first()
                .map_or([1, 1], |l| [l.num_heads, l.num_kv_heads]);
            std::sync::Arc::new(
                crate::llama::Layout::padded(&[n], n)
                    .attention([heads[0], heads[1], d], self.rope_theta),
            )
        });
        let mut x = self.embed_tokens.forward(input);
        for (layer, slot) in self.layers.iter().zip(&mut cache.layers) {
            x = layer.forward_cached(x, slot, &rope, mask.as_ref(), fused.as_ref(), d);
        }
        cache.len += n;
        crate::fused::rms_norm(x, &self.norm)
    }
}

/// The rotary tables of the positions being decoded.
struct Rope {
    /// `[1, 1, n, head_dim]` each; `sin` negated in its first half (`rotate_half`).
    cos: Tensor<4>,
    sin: Tensor<4>,
}

impl Rope {
    /// # Shapes
    /// - x, output: `[1, heads, n, head_dim]`
    fn rotate(&self, x: Tensor<4>) -> Tensor<4> {
        let d = x.dims()[3];
        let swapped = Tensor::cat(
            vec![
                x.clone().narrow(3, d / 2, d / 2),
                x.clone().narrow(3, 0, d / 2),
            ],
            3,
        );
        x * self.cos.clone() + swapped * self.sin.clone()
    }
}

impl LlamaLayer {
    /// One layer over new tokens, with its keys and values cached in `slot`.
    ///
    /// # Shapes
    /// - x, output: `[1, n, hidden]`
    fn forward_cached(
        &self,
        x: Tensor<3>,
        slot: &mut Option<(Tensor<4>, Tensor<4>)>,
        rope: &Rope,
        mask: Option<&Tensor<4>>,
        fused: Option<&std::sync::Arc<crate::attention::Attention>>,
        d: usize,
    ) -> Tensor<3> {
        let [_, n, _] = x.dims();
        let (heads, kv_heads) = (self.num_heads, self.num_kv_heads);
        let group = heads / kv_heads;
        let normed = crate::fused::rms_norm(x.clone(), &self.input_layernorm);
        let split = |t: Tensor<3>, h: usize| t.reshape([1, n, h, d]).swap_dims(1, 2);
        let q = self.q_proj.forward(normed.clone());
        let k = self.k_proj.forward(normed.clone());
        let v = self.v_proj.forward(normed);
        if let Some(attention) = fused {
            let context = attention.forward(q, k.clone(), v.clone());
            *slot = Some((rope.rotate(split(k, kv_heads)), split(v, kv_heads)));
            return self.after_attention(x, context);
        }
        let q = rope.rotate(split(q, heads));
        let k = rope.rotate(split(k, kv_heads));
        let v = split(v, kv_heads);
        let (k, v) = match slot.take() {
            Some((k_past, v_past)) => (
                Tensor::cat(vec![k_past, k], 2),
                Tensor::cat(vec![v_past, v], 2),
            ),
            None => (k, v),
        };
        let total = k.dims()[2];
        // The `group` query heads sharing a KV head are stacked along the sequence axis, so
        // one matmul per KV head serves them all (as training's attention does).
        let q = q
            .mul_scalar((d as f64).powf(-0.5))
            .reshape([1, kv_heads, group * n, d]);
        let mut scores = q
            .matmul(k.clone().swap_dims(2, 3))
            .reshape([1, heads, n, total]);
        if let Some(mask) = mask {
            scores = scores + mask.clone();
        }
        let context = softmax(scores, 3)
            .reshape([1, kv_heads, group * n, total])
            .matmul(v.clone())
            .reshape([1, heads, n, d])
            .swap_dims(1, 2)
            .reshape([1, n, heads * d]);
        *slot = Some((k, v));
        self.after_attention(x, context)
    }
}

/// Timing of greedy generation, for comparison with transformers' `generate`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerationBench {
    /// From the prompt to the first generated token (the prompt's forward pass).
    pub first_token_seconds: f64,
    /// Generated tokens after the first, per second.
    pub tokens_per_second: f64,
    pub new_tokens: usize,
}

/// Greedy decoding of `new_tokens` tokens after `prompt` (never stopping at end of
/// sequence) on the model in `model_dir` with a LoRA adapter of `lora`'s shape, in
/// `compute`'s precision, as serving runs it (`cached`) or by recomputing the whole sequence
/// for every token.
pub fn bench_generation(
    model_dir: &std::path::Path,
    lora: &crate::spec::LoraSpec,
    prompt: &[u32],
    new_tokens: usize,
    cached: bool,
    compute: crate::spec::Compute,
) -> crate::error::Result<GenerationBench> {
    let device = crate::device::device();
    let config = crate::llama::LlamaConfig::from_json(&crate::checkpoint::read_config(model_dir)?)?;
    let mut model = config.load(
        &mut crate::checkpoint::Checkpoint::open(model_dir)?,
        Some(lora),
        &device,
    )?;
    model.set_compute(compute)?;
    let greedy = |hidden: Tensor<3>| -> u32 {
        let [_, n, h] = hidden.dims();
        let logits = model.logits(hidden.narrow(1, n - 1, 1).reshape([1, h]));
        logits.argmax(1).into_scalar::<i64>() as u32
    };
    let mut ids = prompt.to_vec();
    let mut cache = KvCache::new(&model);
    let started = std::time::Instant::now();
    let mut first = 0.0;
    for step in 0..new_tokens {
        let hidden = if cached {
            let new = ids[cache.len..].to_vec();
            model.hidden_cached(&new, &mut cache)
        } else {
            model.hidden_of(&ids)
        };
        ids.push(greedy(hidden));
        if step == 0 {
            first = started.elapsed().as_secs_f64();
        }
    }
    let rest = started.elapsed().as_secs_f64() - first;
    Ok(GenerationBench {
        first_token_seconds: first,
        tokens_per_second: (new_tokens.saturating_sub(1)) as f64 / rest.max(1e-9),
        new_tokens,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use burn::tensor::Tensor;

    use super::KvCache;
    use crate::checkpoint::Checkpoint;

    /// The prompt in one cached pass, then one token, then two: the same hidden states as
    /// the whole sequence in one uncached pass (the fused attention), to f32 rounding. The
    /// fixture has grouped-query attention (4 query heads on 2 KV heads).
    #[test]
    fn cached_decoding_matches_the_whole_forward_pass() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        let device = crate::device::device();
        let config = crate::checkpoint::read_config(&dir).unwrap();
        let model = crate::llama::LlamaConfig::from_json(&config)
            .unwrap()
            .load(&mut Checkpoint::open(&dir).unwrap(), None, &device)
            .unwrap();
        let ids: Vec<u32> = vec![1, 17, 5, 42, 9, 23, 7, 3];
        let s = ids.len();
        let whole = model.hidden_of(&ids);
        let mut cache = KvCache::new(&model);
        let pieces: Vec<Tensor<3>> = [&ids[..5], &ids[5..6], &ids[6..]]
            .into_iter()
            .map(|new| model.hidden_cached(new, &mut cache))
            .collect();
        assert_eq!(cache.len(), s);
        let cached = Tensor::cat(pieces, 1);
        let diff: f32 = (cached - whole).abs().max().into_scalar();
        assert!(diff < 1e-4, "cached decoding differs by {diff}");
    }
}
