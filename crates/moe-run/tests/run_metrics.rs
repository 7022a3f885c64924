//! MLflow's legacy file-store runs, loss-curve plots and run config files.

use moe_data::TokenizerKind;
use moe_routers::{Gate, RouterConfig, WeightsOn};
use moe_run::{
    plot_loss_curve, plot_series, JsonlWriter, LossCurves, MlflowFileStoreRun, RunConfig, RunStatus,
};
use moe_train::{DecayGroups, LrSchedule, TrainEvent};
use std::path::PathBuf;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moe-metrics-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `key: value` lines of a flat YAML file.
fn yaml(path: &std::path::Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l
                .split_once(": ")
                .unwrap_or_else(|| panic!("not `key: value`: {l}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn get<'a>(fields: &'a [(String, String)], key: &str) -> &'a str {
    &fields
        .iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("no {key}"))
        .1
}

#[test]
fn mlflow_runs_follow_the_file_store_layout() {
    let root = temp_dir("mlruns").join("mlruns");
    let run = MlflowFileStoreRun::create(&root, "shakespeare", "first").unwrap();
    run.log_param("model.n_embd", 128).unwrap();
    for (step, v) in [(0, 4.2), (10, 3.1)] {
        run.log_metric("val_loss", v, step).unwrap();
    }
    let png = run.dir().join("plot.png");
    std::fs::write(&png, b"png").unwrap();
    run.log_artifact(&png).unwrap();
    run.finish(RunStatus::Finished).unwrap();
    assert_eq!(
        std::fs::read(run.dir().join("artifacts").join("plot.png")).unwrap(),
        b"png"
    );

    let exp = yaml(&root.join("1").join("meta.yaml"));
    assert_eq!(get(&exp, "name"), "'shakespeare'");
    assert_eq!(get(&exp, "experiment_id"), "'1'");
    assert_eq!(get(&exp, "lifecycle_stage"), "active");
    assert!(get(&exp, "artifact_location").starts_with("file:///"));
    assert_eq!(
        get(&yaml(&root.join("0").join("meta.yaml")), "name"),
        "'Default'"
    );

    let meta = yaml(&run.dir().join("meta.yaml"));
    assert_eq!(get(&meta, "run_id"), run.run_id());
    assert_eq!(run.run_id().len(), 32);
    assert_eq!(get(&meta, "status"), "3");
    assert_eq!(get(&meta, "run_name"), "'first'");
    let (start, end): (u128, u128) = (
        get(&meta, "start_time").parse().unwrap(),
        get(&meta, "end_time").parse().unwrap(),
    );
    assert!(start > 1_600_000_000_000 && end >= start);
    assert_eq!(
        std::fs::read_to_string(run.dir().join("params").join("model.n_embd")).unwrap(),
        "128"
    );
    let lines: Vec<Vec<String>> =
        std::fs::read_to_string(run.dir().join("metrics").join("val_loss"))
            .unwrap()
            .lines()
            .map(|l| l.split(' ').map(String::from).collect())
            .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1][1..], ["3.1".to_string(), "10".to_string()]);
    assert!(lines[1][0].parse::<u128>().unwrap() >= start);

    // A second run of the same experiment goes into the same folder.
    let again = MlflowFileStoreRun::create(&root, "shakespeare", "second").unwrap();
    assert_eq!(
        again.dir().parent().unwrap(),
        root.join("1").canonicalize().unwrap()
    );
    let other = MlflowFileStoreRun::create(&root, "other", "x").unwrap();
    assert!(other
        .dir()
        .starts_with(root.join("2").canonicalize().unwrap()));
}

#[test]
fn loss_curves_are_read_from_metrics_and_plotted_as_png() {
    let dir = temp_dir("plot");
    let metrics = dir.join("metrics.jsonl");
    let eval = |step, train_loss, val_loss, load_cv| TrainEvent::Eval {
        step,
        train_loss,
        val_loss,
        ms_per_step: 1.0,
        tokens_per_s: 1.0,
        eval_s: 0.1,
        load_cv,
        routing: Vec::new(),
    };
    let end = TrainEvent::End {
        steps: 100,
        train_loss: Some(2.5),
        val_loss: Some(2.6),
        wall_s: 3.0,
    };
    let mut writer = JsonlWriter::create(&metrics).unwrap();
    for record in [eval(0, 4.2, 4.3, 0.5), eval(100, 2.5, 2.6, 0.02), end] {
        writer.write(&record).unwrap();
    }
    let curves = LossCurves::from_jsonl(&metrics).unwrap();
    assert_eq!(curves.train, vec![(0, 4.2), (100, 2.5)]);
    assert_eq!(curves.val, vec![(0, 4.3), (100, 2.6)]);
    assert_eq!(curves.balance, vec![(0, 0.5), (100, 0.02)]);
    // An eval record that lacks a field is an error naming the line.
    std::fs::write(&metrics, "{\"event\":\"eval\",\"step\":0}\n").unwrap();
    let err = LossCurves::from_jsonl(&metrics).unwrap_err().to_string();
    assert!(err.contains("line 1"), "{err}");
    let png = dir.join("loss_curve.png");
    plot_loss_curve(&png, "tiny run", &curves).unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    assert_eq!((be(16), be(20)), (1000, 600), "IHDR width and height");
    assert!(plot_loss_curve(&png, "empty", &LossCurves::default()).is_err());
    // Series against trials, with a title and axis labels.
    let series = plot_series(
        &png,
        "best so far",
        ("trial", "loss"),
        &[("a", &[(1, 2.0), (2, 1.5)]), ("b", &[(1, 2.2)])],
    );
    series.unwrap();
    assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    assert!(plot_series(&png, "t", ("x", "y"), &[("a", &[])]).is_err());
}

#[test]
fn run_configs_read_toml_and_json_with_defaults_and_reject_unknown_fields() {
    let write = |path: &PathBuf, text: &str| {
        std::fs::write(path, text).unwrap();
        path.clone()
    };
    let dir = temp_dir("config");
    let toml_path = dir.join("run.toml");
    std::fs::write(
        &toml_path,
        "[model]\nn_layer = 3\n[model.router]\nkind = \"sigmoid_aux_free\"\nn_group = 4\n\
         topk_group = 2\nbias = false\nrouted_scaling_factor = 2.5\n[train]\nmax_iters = 7\n\
         [tokenizer]\nkind = \"bpe\"\n",
    )
    .unwrap();
    let config = RunConfig::from_file(&toml_path).unwrap();
    // No `family`: makeMoE's, as configs written before there were families.
    let model = config.model.as_make_moe().unwrap();
    assert_eq!(model.n_layer, 3);
    // The router's table holds the gate's `kind` and settings next to its
    // own; unset settings take their defaults.
    assert_eq!(
        model.router,
        RouterConfig {
            gate: Gate::SigmoidAuxFree {
                norm_topk_prob: true,
                bias_update_rate: 1e-3,
                n_group: 4,
                topk_group: 2,
            },
            bias: false,
            routed_scaling_factor: 2.5,
            capacity_factor: None,
            weights_on: WeightsOn::Output,
        }
    );
    let default = RunConfig::default();
    assert_eq!(model.n_embd, default.model.as_make_moe().unwrap().n_embd);
    assert_eq!(config.train.max_iters, 7);
    assert_eq!(config.tokenizer.kind, TokenizerKind::Bpe);
    // TOML out, TOML in: the same config; JSON too.
    let printed = dir.join("printed.toml");
    std::fs::write(&printed, config.to_toml().unwrap()).unwrap();
    assert_eq!(RunConfig::from_file(&printed).unwrap(), config);
    let json_path = dir.join("run.json");
    std::fs::write(&json_path, serde_json::to_string(&config).unwrap()).unwrap();
    assert_eq!(RunConfig::from_file(&json_path).unwrap(), config);

    std::fs::write(&toml_path, "[model]\nn_layers = 3\n").unwrap();
    let err = RunConfig::from_file(&toml_path).unwrap_err().to_string();
    assert!(
        err.contains("run.toml") && err.contains("n_layers"),
        "{err}"
    );
    // A setting of another gate is unknown to this one.
    let capped = "[model.router]\nkind = \"top_k\"\ncapacity_factor = 1.0\n";
    let config = RunConfig::from_file(&write(&toml_path, capped)).unwrap();
    let router = &config.model.as_make_moe().unwrap().router;
    assert_eq!(router.capacity_factor, Some(1.0));
    assert_eq!(
        router.gate,
        Gate::TopK {
            norm_topk_prob: true
        }
    );
    let err = RunConfig::from_file(&write(
        &toml_path,
        "[model.router]\nkind = \"top_k\"\nn_group = 4\n",
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("model.router.n_group"), "{err}");
    let err = RunConfig::from_file(&write(&toml_path, "[model.router]\nkind = \"switch\"\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("switch") && err.contains("top_k"), "{err}");
    let yaml = dir.join("run.yaml");
    std::fs::write(&yaml, "").unwrap();
    assert!(RunConfig::from_file(&yaml)
        .unwrap_err()
        .to_string()
        .contains(".toml or .json"));
}

#[test]
fn run_configs_select_the_decoder_family_and_the_training_options() {
    let dir = temp_dir("decoder-config");
    let path = dir.join("run.toml");
    std::fs::write(
        &path,
        "[model]\nfamily = \"decoder\"\nnum_hidden_layers = 2\nnum_local_experts = 4\n\
         [model.router]\nkind = \"sigmoid_aux_free\"\nn_group = 2\ntopk_group = 1\n\
         [train]\ngrad_clip = 1.0\ngrad_accum_steps = 2\nweight_decay_on = \"matrices\"\n\
         [train.lr_schedule]\nkind = \"warmup_cosine\"\nwarmup_iters = 100\nmin_lr = 0.0001\n",
    )
    .unwrap();
    let config = RunConfig::from_file(&path).unwrap();
    let decoder = config.model.as_decoder().unwrap();
    assert_eq!(decoder.num_hidden_layers, 2);
    assert_eq!(decoder.num_local_experts, 4);
    assert!(matches!(
        decoder.router.gate,
        Gate::SigmoidAuxFree {
            n_group: 2,
            topk_group: 1,
            ..
        }
    ));
    assert_eq!(config.train.grad_accum_steps, 2);
    assert_eq!(config.train.weight_decay_on, DecayGroups::Matrices);
    assert_eq!(
        config.train.lr_schedule,
        LrSchedule::WarmupCosine {
            warmup_iters: 100,
            min_lr: 1e-4,
            decay_iters: None
        }
    );
    config.model.validate().unwrap();
    // The printed config reads back as the same config.
    let printed = dir.join("printed.toml");
    std::fs::write(&printed, config.to_toml().unwrap()).unwrap();
    assert_eq!(RunConfig::from_file(&printed).unwrap(), config);
    std::fs::write(&path, "[model]\nfamily = \"gpt\"\n").unwrap();
    let err = RunConfig::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("unknown model family `gpt`"), "{err}");
}
