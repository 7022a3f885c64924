//! The memory plan of a folder, from its config and headers alone, against
//! the model loaded from it: the same parameter count, the active count of
//! its config, and the KV cache a forward pass really stores.

mod common;

use common::{fixture, FAMILIES};
use moe_hf::{from_pretrained, memory_plan, LoadOptions};
use moe_models::CausalLm;
use tch::{Kind, Tensor};

#[test]
fn the_plan_counts_what_loading_holds() {
    for name in FAMILIES {
        let dir = fixture(name);
        for kind in [Kind::Float, Kind::BFloat16] {
            let plan = memory_plan(&dir, Some(kind), &[]).unwrap();
            let loaded = from_pretrained(
                &dir,
                &LoadOptions {
                    dtype: Some(kind),
                    ..LoadOptions::default()
                },
            )
            .unwrap();
            let vars = loaded.vs.variables();
            let params: i64 = vars.values().map(|t| t.numel() as i64).sum();
            let bytes: u64 = vars
                .values()
                .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
                .sum();
            assert_eq!(plan.total_params, params, "{name}: parameters");
            assert_eq!(plan.weight_bytes, bytes, "{name} {kind:?}: weight bytes");
            assert_eq!(
                plan.active_params,
                loaded.config.active_params(params),
                "{name}: active"
            );
            assert!(plan.active_params <= plan.total_params);
            assert_eq!(plan.context, loaded.config.max_position_embeddings);

            // The KV cache after 7 tokens holds 7 tokens' worth of bytes.
            let mut cache = loaded.model.new_cache();
            let idx = Tensor::from_slice(&[1i64, 5, 9, 2, 7, 3, 4]).unsqueeze(0);
            tch::no_grad(|| loaded.model.forward_cached(&idx, &mut cache)).unwrap();
            let stored: i64 = cache
                .layers_mut(loaded.config.num_hidden_layers as usize)
                .iter()
                .map(|c| c.stored_bytes())
                .sum();
            assert_eq!(
                stored as u64,
                7 * plan.kv_bytes_per_token,
                "{name} {kind:?}: KV cache bytes"
            );
        }
        // `None` plans in the files' dtype: the fixtures are saved in bf16
        // (gpt-oss's experts in MXFP4: half a byte a value, and a scale
        // byte per 32).
        let auto = memory_plan(&dir, None, &[]).unwrap();
        assert_eq!(auto.dtype, Kind::BFloat16, "{name}");
        if name == "gpt_oss_mxfp4" {
            let c = &auto;
            let experts = 2 * 3 * 32 * 32 * 8; // 2 layers x (2I + I) x H x E
            assert_eq!(c.file_bytes["U8"], (experts / 2 + experts / 32) as u64);
            assert_eq!(
                c.file_bytes["BF16"],
                2 * (c.total_params as u64 - experts as u64),
                "{name}"
            );
            continue;
        }
        assert_eq!(
            auto.file_bytes.keys().collect::<Vec<_>>(),
            ["BF16"],
            "{name}"
        );
        assert_eq!(
            auto.file_bytes["BF16"],
            2 * auto.total_params as u64,
            "{name}"
        );
        assert!(auto.fits(auto.resident_bytes()) && !auto.fits(auto.resident_bytes() - 1));
    }
}

#[test]
fn a_plan_in_an_integer_dtype_or_of_a_missing_folder_is_an_error() {
    let err = memory_plan(&fixture("mixtral"), Some(Kind::Int8), &[]).unwrap_err();
    assert!(err.to_string().contains("floating-point"), "{err}");
    let err = memory_plan(&fixture("no_such_folder"), None, &[]).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
}
