//! Incremental decoding with a KV cache against the full causal forward.

use moe_core::MoeError;
use moe_nn::{AttentionConfig, AttentionPath, AttentionScale, CausalSelfAttention, KvCache};
use tch::{nn, Device, Kind, Tensor};

fn layer(path: AttentionPath) -> (nn::VarStore, CausalSelfAttention) {
    tch::manual_seed(17);
    let vs = nn::VarStore::new(Device::Cpu);
    let config = AttentionConfig {
        n_embd: 24,
        n_head: 3,
        block_size: 12,
        dropout: 0.1,
        path,
        scale: AttentionScale::Embedding,
        ..Default::default()
    };
    let attn = CausalSelfAttention::new(&vs.root(), config).unwrap();
    (vs, attn)
}

#[test]
fn prefill_then_one_position_at_a_time_equals_the_full_forward() {
    for path in [AttentionPath::Fused, AttentionPath::PerHead] {
        let (_vs, attn) = layer(path);
        let x = Tensor::randn([2, 12, 24], (Kind::Float, Device::Cpu));
        let full = attn.forward_t(&x, false).unwrap();
        let mut cache = KvCache::new();
        // Chunks of 4, 1, 3, 1, 1, 2 positions: prefill, single steps, and
        // multi-position chunks after a non-empty cache (the masked case).
        let mut parts = Vec::new();
        let mut start = 0;
        for len in [4, 1, 3, 1, 1, 2] {
            parts.push(
                attn.forward_cached(&x.narrow(1, start, len), &mut cache)
                    .unwrap(),
            );
            start += len;
            assert_eq!(cache.len(), start);
        }
        let cached = Tensor::cat(&parts, 1);
        let diff = (&cached - &full).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{path:?}: cached output differs by {diff}");
    }
}

#[test]
fn a_full_cache_or_another_batch_size_is_an_error() {
    let (_vs, attn) = layer(AttentionPath::Fused);
    let mut cache = KvCache::new();
    let x = Tensor::randn([2, 12, 24], (Kind::Float, Device::Cpu));
    let _ = attn.forward_cached(&x, &mut cache).unwrap();
    let one = x.narrow(1, 0, 1);
    assert!(matches!(
        attn.forward_cached(&one, &mut cache),
        Err(MoeError::SequenceTooLong {
            len: 13,
            block_size: 12
        })
    ));
    cache.clear();
    let _ = attn.forward_cached(&one, &mut cache).unwrap();
    let other_batch = Tensor::randn([3, 1, 24], (Kind::Float, Device::Cpu));
    assert!(matches!(
        attn.forward_cached(&other_batch, &mut cache),
        Err(MoeError::Shape { .. })
    ));
}
