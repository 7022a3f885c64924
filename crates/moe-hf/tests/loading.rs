//! How `from_pretrained` builds a model: in the checkpoint's dtype by
//! default, without drawing an initial value, with the tensors stored as
//! the parameters hold them used from the file's pages, not copied; and a
//! model computing in bf16 gives the f32 model's logits within the bound
//! of bf16 arithmetic.

mod common;

use common::{bf16_logit_tolerance, fixture, load, max_abs_diff};
use moe_hf::{checkpoint_dtype, from_pretrained, ExpertStorage, LoadOptions};
use moe_models::CausalLm;
use tch::{Kind, Tensor};

/// The lines of `/proc/self/maps` as (start, end, file).
fn memory_maps() -> Vec<(usize, usize, String)> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (start, end) = fields.next()?.split_once('-')?;
            let file = fields.nth(4).unwrap_or("").to_string();
            Some((
                usize::from_str_radix(start, 16).ok()?,
                usize::from_str_radix(end, 16).ok()?,
                file,
            ))
        })
        .collect()
}

/// The file mapped at `address`, if any.
fn mapped_file(address: usize) -> Option<String> {
    memory_maps()
        .into_iter()
        .find(|(start, end, _)| (*start..*end).contains(&address))
        .map(|(_, _, file)| file)
}

#[test]
fn loads_in_the_files_dtype_without_drawing_and_maps_what_is_stored_as_is() {
    let dir = fixture("olmoe");
    assert_eq!(checkpoint_dtype(&dir).unwrap(), Kind::BFloat16);
    let drawn = moe_core::variables_drawn();
    let pretrained = from_pretrained(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(
        moe_core::variables_drawn(),
        drawn,
        "loading drew initial values"
    );
    let vars = pretrained.vs.variables();
    assert!(vars.values().all(|t| t.kind() == Kind::BFloat16));
    // Attention, norms, embeddings and the head are stored as the
    // parameters hold them: their storage is the weights file's map.
    let file = std::fs::canonicalize(dir.join("model.safetensors")).unwrap();
    for name in [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.input_layernorm.weight",
    ] {
        let address = vars[name].data_ptr() as usize;
        assert_eq!(
            mapped_file(address).as_deref(),
            file.to_str(),
            "{name} at {address:#x} is not in the file's map"
        );
    }
    // Expert banks stack per-expert tensors: copied, into anonymous memory.
    let bank = vars
        .iter()
        .find(|(name, _)| name.ends_with("experts/w_in") || name.ends_with("experts.w_in"))
        .map(|(name, t)| (name.clone(), t.data_ptr() as usize));
    if let Some((name, address)) = bank {
        assert_ne!(mapped_file(address).as_deref(), file.to_str(), "{name}");
    }
    let load = pretrained.load;
    let total: u64 = vars
        .values()
        .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
        .sum();
    assert!(load.mapped_bytes > 0 && load.copied_bytes > 0, "{load:?}");
    assert_eq!(load.mapped_bytes + load.copied_bytes, total, "{load:?}");
}

#[test]
fn mapped_parameters_can_be_trained_without_touching_the_file() {
    let dir = fixture("llama");
    let before = std::fs::read(dir.join("model.safetensors")).unwrap();
    let pretrained = from_pretrained(&dir, &LoadOptions::default()).unwrap();
    let mut weight = pretrained.vs.variables()["model.norm.weight"].shallow_clone();
    let _ = tch::no_grad(|| weight.fill_(3.0));
    assert_eq!(weight.double_value(&[0]), 3.0);
    drop(pretrained);
    assert!(before == std::fs::read(dir.join("model.safetensors")).unwrap());
    // A fresh load reads the file's values again.
    let again = from_pretrained(&dir, &LoadOptions::default()).unwrap();
    assert_ne!(
        again.vs.variables()["model.norm.weight"].double_value(&[0]),
        3.0
    );
}

#[test]
fn bf16_logits_are_the_f32_ones_within_bf16_arithmetic() {
    for name in ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3"] {
        let dir = fixture(name);
        let f32_model = load(&dir);
        let bf16_model = from_pretrained(&dir, &LoadOptions::default()).unwrap();
        assert_eq!(bf16_model.config.precision, moe_core::Precision::Bf16);
        let prompt: Vec<i64> = (0..12)
            .map(|i| (i * 37 + 5) % f32_model.config.vocab_size)
            .collect();
        let idx = Tensor::from_slice(&prompt).unsqueeze(0);
        let (want, got) = tch::no_grad(|| {
            (
                f32_model.model.forward_t(&idx, false).unwrap(),
                bf16_model.model.forward_t(&idx, false).unwrap(),
            )
        });
        assert_eq!(got.logits.kind(), Kind::Float, "{name}: logits in f32");
        // The bound holds where both route alike; these prompts' routing
        // gaps are wide enough for bf16 (a differing expert would show here).
        for (m, (a, b)) in want.routings.iter().zip(&got.routings).enumerate() {
            let sorted = |r: &moe_core::Routing| r.indices().unwrap().sort(-1, false).0;
            assert!(
                sorted(a).equal(&sorted(b)),
                "{name}, MoE layer {m}: bf16 routed a token elsewhere"
            );
        }
        let diff = max_abs_diff(&got.logits, &want.logits);
        let bound = bf16_logit_tolerance(&f32_model.config, &f32_model.vs, prompt.len() as i64);
        println!("{name}: bf16 vs f32 max |logit diff| {diff:e}, bound {bound:e}");
        assert!(diff <= bound, "{name}: {diff:e} > {bound:e}");
        // And bf16 is not f32 (the comparison can fail).
        assert!(diff > 0.0, "{name}: bf16 and f32 logits are identical");
    }
}

#[test]
fn a_device_that_cannot_compute_is_an_error_before_loading() {
    if tch::Cuda::is_available() {
        return;
    }
    let err = from_pretrained(
        &fixture("mixtral"),
        &LoadOptions {
            device: tch::Device::Cuda(0),
            ..LoadOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, moe_core::MoeError::Config(_)), "{err}");
    assert!(err.to_string().contains("BFloat16"), "{err}");
}

/// Greedy tokens and the residency's counts of `dir` loaded with its
/// routed experts left in the files and a cache of `experts` experts.
fn mapped_greedy(
    dir: &std::path::Path,
    prompt: &[i64],
    experts: u64,
) -> (Vec<i64>, moe_experts::ResidencyStats) {
    let resident = from_pretrained(dir, &LoadOptions::default()).unwrap();
    let c = &resident.config;
    let per_expert = (3 * c.hidden_size * c.expert_width() * 2) as u64;
    let mapped = from_pretrained(
        dir,
        &LoadOptions {
            experts: ExpertStorage::Mapped {
                cache_bytes: experts * per_expert,
            },
            ..LoadOptions::default()
        },
    )
    .unwrap();
    // The banks hold nothing of their own: the experts are the files'.
    let residency = mapped.residency.clone().unwrap();
    let tokens = moe_models::generate(
        &mapped.model,
        prompt,
        12,
        moe_models::Sampling::greedy(),
        |_| {},
    )
    .unwrap();
    (tokens, residency.stats())
}

#[test]
fn experts_left_in_the_files_give_the_resident_tokens_with_two_cached_per_layer() {
    for name in ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3"] {
        let dir = fixture(name);
        let resident = from_pretrained(&dir, &LoadOptions::default()).unwrap();
        let prompt: Vec<i64> = (0..6)
            .map(|i| (i * 11 + 3) % resident.config.vocab_size)
            .collect();
        let want = moe_models::generate(
            &resident.model,
            &prompt,
            12,
            moe_models::Sampling::greedy(),
            |_| {},
        )
        .unwrap();
        let layers = resident.config.num_moe_layers() as u64;
        let (got, stats) = mapped_greedy(&dir, &prompt, 2 * layers);
        assert_eq!(got, want, "{name}: tokens with experts left in the files");
        println!("{name}: {stats:?}, hit rate {:.3}", stats.hit_rate());
        assert!(stats.misses > 0 && stats.evictions > 0, "{name}: {stats:?}");
        assert!(
            stats.resident_bytes <= stats.capacity_bytes,
            "{name}: {stats:?}"
        );
        // Every use of a token's k experts per MoE layer is counted once.
        let k = resident.config.num_experts_per_tok as u64;
        let positions = (prompt.len() + 11) as u64;
        assert!(
            stats.hits + stats.misses <= positions * k * layers,
            "{name}: {stats:?}"
        );
        assert!(
            stats.hits + stats.misses >= 12 * layers,
            "{name}: {stats:?}"
        );
        // With room for every expert, all but the first use of each hit.
        let all = resident.config.num_local_experts as u64 * layers;
        let (again, roomy) = mapped_greedy(&dir, &prompt, all);
        assert_eq!(again, want, "{name}");
        assert_eq!(roomy.evictions, 0, "{name}: {roomy:?}");
        assert!(roomy.misses <= all, "{name}: {roomy:?}");
    }
}

#[test]
fn bad_expert_storage_and_quantisation_requests_are_errors() {
    let dir = fixture("olmoe");
    let resident = from_pretrained(&dir, &LoadOptions::default()).unwrap();
    let c = &resident.config;
    let per_expert = (3 * c.hidden_size * c.expert_width() * 2) as u64;
    let mapped = |cache_bytes, dtype| {
        from_pretrained(
            &dir,
            &LoadOptions {
                dtype,
                experts: ExpertStorage::Mapped { cache_bytes },
                ..LoadOptions::default()
            },
        )
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    // Smaller than one layer's top-k experts.
    let err = mapped(per_expert, None);
    assert!(err.contains("top-2") && err.contains("at least"), "{err}");
    // Another dtype than the files'.
    let err = mapped(1 << 30, Some(Kind::Float));
    assert!(err.contains("BFloat16") && err.contains("Float"), "{err}");
    // A dense model has no experts to quantise.
    let err = from_pretrained(
        &fixture("llama"),
        &LoadOptions {
            quantize_experts: Some(moe_experts::ExpertQuantization::Int8),
            ..LoadOptions::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no routed experts"), "{err}");
    // gpt-oss's interleaved experts cannot stay in the files; quantised,
    // they are read resident and then quantised.
    let gpt_oss = fixture("gpt_oss");
    let err = from_pretrained(
        &gpt_oss,
        &LoadOptions {
            experts: ExpertStorage::Mapped {
                cache_bytes: 1 << 30,
            },
            ..LoadOptions::default()
        },
    )
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(err.contains("interleave"), "{err}");
    let int8 = from_pretrained(
        &gpt_oss,
        &LoadOptions {
            quantize_experts: Some(moe_experts::ExpertQuantization::Int8),
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert!(int8.residency.is_none());
    for layer in int8.model.layers() {
        let moe_models::decoder::FeedForward::Moe(moe) = layer.feed_forward_network() else {
            panic!("gpt-oss's layers are all MoE")
        };
        assert_eq!(
            moe.experts().quantization(),
            Some(moe_experts::ExpertQuantization::Int8)
        );
        assert!(moe.experts().b_gate.is_some(), "the gate biases stay float");
    }
}

#[test]
fn command_line_names_become_load_options_or_errors() {
    use moe_hf::dtype_by_name;
    assert_eq!(dtype_by_name("auto").unwrap(), None);
    assert_eq!(dtype_by_name("BF16").unwrap(), Some(Kind::BFloat16));
    assert_eq!(dtype_by_name("float32").unwrap(), Some(Kind::Float));
    let err = dtype_by_name("int4").unwrap_err().to_string();
    assert!(
        err.contains("int4") && err.contains("expected f32, bf16"),
        "{err}"
    );
    assert_eq!(
        ExpertStorage::with_cache_gib(None).unwrap(),
        ExpertStorage::Resident
    );
    assert_eq!(
        ExpertStorage::with_cache_gib(Some(0.5)).unwrap(),
        ExpertStorage::Mapped {
            cache_bytes: 1 << 29
        }
    );
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let err = ExpertStorage::with_cache_gib(Some(bad))
            .unwrap_err()
            .to_string();
        assert!(err.contains("positive number of GiB"), "{bad}: {err}");
    }
}
