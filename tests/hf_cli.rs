//! `generate --model DIR` on a Hugging Face checkpoint folder: the
//! checkpoint's tokenizer, greedy by its generation config, and the same
//! tokens as the library's generation; several prompts in one batch give
//! each prompt's own continuation.

mod common;

use common::ok;
use moe_layers::hf::{from_pretrained, LoadOptions};
use moe_layers::lm::{generate, Sampling, TextStream};
use std::path::Path;
use std::process::Command;

#[test]
fn generate_plans_a_folder_without_loading_it() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hf/mixtral");
    let params: i64 = from_pretrained(&dir, &LoadOptions::default())
        .unwrap()
        .vs
        .variables()
        .values()
        .map(|t| t.numel() as i64)
        .sum();
    let plan = |extra: &[&str]| {
        ok(&Command::new(common::example("generate"))
            .args(["--model", dir.to_str().unwrap(), "--plan"])
            .args(extra)
            .output()
            .unwrap())
    };
    let text = plan(&["--dtype", "auto", "--memory-gib", "1"]);
    assert!(
        text.contains(&format!("parameters:          {params} total")),
        "{text}"
    );
    assert!(
        text.contains("weights as BFloat16") && text.contains("fits"),
        "{text}"
    );
    // The default dtype is the files' (bf16 here); f32 on request.
    let text = plan(&["--memory-gib", "0.00001"]);
    assert!(
        text.contains("weights as BFloat16") && text.contains("does not fit"),
        "{text}"
    );
    let text = plan(&["--dtype", "f32", "--memory-gib", "1"]);
    assert!(text.contains("weights as Float"), "{text}");
    let out = Command::new(common::example("generate"))
        .args([
            "--model",
            dir.to_str().unwrap(),
            "--plan",
            "--dtype",
            "int4",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected f32, bf16, f16, f64 or auto"));
}

#[test]
fn generate_reads_a_hugging_face_folder() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hf/mixtral");
    let prompt = "First Citizen:";
    let out = Command::new(common::example("generate"))
        .args(["--model", dir.to_str().unwrap(), "--prompt", prompt])
        .args(["--max-new-tokens", "12", "--device", "cpu"])
        .output()
        .unwrap();
    let text = ok(&out);
    // What the library generates (greedy: the file has no do_sample).
    let pretrained = from_pretrained(&dir, &LoadOptions::default()).unwrap();
    let tokenizer = pretrained.tokenizer.as_ref().unwrap();
    let ids = tokenizer.encode(prompt).unwrap();
    let new = generate(&pretrained.model, &ids, 12, Sampling::greedy(), |_| {}).unwrap();
    let mut stream = TextStream::new(tokenizer);
    for &id in &ids {
        stream.push(id).unwrap();
    }
    let continuation: String = new.iter().map(|&id| stream.push(id).unwrap()).collect();
    assert_eq!(text, format!("{prompt}{continuation}\n"));
    assert!(!continuation.is_empty());

    // Several prompts: one batch, each row as its prompt alone. In f32:
    // in bf16 a row of a batch and a row alone go through different kernels
    // (one row: `moe_core::gemv`), which round differently.
    let prompts = ["All:", "First Citizen:", "You are all resolved"];
    let mut batched = Command::new(common::example("generate"));
    batched.args(["--model", dir.to_str().unwrap(), "--dtype", "f32"]);
    for p in prompts {
        batched.args(["--prompt", p]);
    }
    let text = ok(&batched
        .args(["--max-new-tokens", "12", "--device", "cpu"])
        .output()
        .unwrap());
    let mut want = String::new();
    for (row, p) in prompts.iter().enumerate() {
        let alone = Command::new(common::example("generate"))
            .args(["--model", dir.to_str().unwrap(), "--prompt", p])
            .args([
                "--max-new-tokens",
                "12",
                "--device",
                "cpu",
                "--dtype",
                "f32",
            ])
            .output()
            .unwrap();
        want.push_str(&format!("--- prompt {row}\n{}", ok(&alone)));
    }
    assert_eq!(text, want);

    // Neither or both sources are usage errors.
    let out = Command::new(common::example("generate"))
        .args(["--prompt", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn llama_moe_converts_a_hugging_face_llama() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out_dir = std::env::temp_dir().join(format!("moe-llama-moe-cli-{}", std::process::id()));
    let out = Command::new(common::example("llama_moe"))
        .args([
            "--model",
            root.join("tests/data/hf/llama").to_str().unwrap(),
        ])
        .args([
            "--construction",
            "upcycle",
            "--experts",
            "4",
            "--top-k",
            "2",
        ])
        .args([
            "--max-iters",
            "3",
            "--eval-interval",
            "2",
            "--eval-iters",
            "1",
        ])
        .args(["--device", "cpu", "--out", out_dir.to_str().unwrap()])
        .output()
        .unwrap();
    let text = ok(&out);
    assert!(text.contains("loaded"), "{text}");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("conversion.json")).unwrap())
            .unwrap();
    assert!(
        record["all_experts_active_max_logit_diff"]
            .as_f64()
            .unwrap()
            < 1e-4
    );
    // The upcycled model is a mixtral checkpoint with the Llama's tokenizer.
    let moe = from_pretrained(&out_dir.join("moe_hf"), &LoadOptions::default()).unwrap();
    assert_eq!(moe.family().model_type(), "mixtral");
    assert_eq!(moe.config.num_local_experts, 4);
    assert!(moe.tokenizer.is_some());
    for run in ["dense", "moe"] {
        assert!(out_dir.join(run).join("metrics.jsonl").is_file(), "{run}");
    }
    std::fs::remove_dir_all(&out_dir).unwrap();
}
