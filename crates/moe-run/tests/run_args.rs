//! The one order of a run's config: the file (or the program's base), the
//! shared flags, the program's own flags, then `--set`.

use clap::Parser;
use moe_run::{RunArgs, RunConfig};

#[derive(Parser)]
struct Program {
    #[command(flatten)]
    run: RunArgs,
}

fn resolve(args: &[&str]) -> RunConfig {
    let program = Program::try_parse_from([&["program"], args].concat()).unwrap();
    program
        .run
        .resolve(RunConfig::default, |config| {
            // The program's flags see the shared ones and come before --set.
            config.train.eval_iters = config.train.max_iters + 1;
            Ok(())
        })
        .unwrap()
}

#[test]
fn flags_then_the_programs_then_set() {
    let base = RunConfig::default();
    let config = resolve(&[]);
    assert_eq!(config.train.max_iters, base.train.max_iters);
    let config = resolve(&["--max-iters", "7", "--lr", "0.5", "--seed", "3"]);
    assert_eq!(
        (
            config.train.max_iters,
            config.train.learning_rate,
            config.train.seed
        ),
        (7, 0.5, 3)
    );
    assert_eq!(
        config.train.eval_iters, 8,
        "the program's flags after the shared ones"
    );
    let config = resolve(&["--max-iters", "7", "--set", "train.eval_iters=2"]);
    assert_eq!(config.train.eval_iters, 2, "--set last");
    let dir = std::env::temp_dir().join(format!("moe-run-args-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("run.toml");
    let mut from_file = RunConfig::default();
    from_file.train.batch_size = 5;
    std::fs::write(&file, from_file.to_toml().unwrap()).unwrap();
    let config = resolve(&["--config", file.to_str().unwrap(), "--batch-size", "6"]);
    assert_eq!(config.train.batch_size, 6, "flags over the file");
    let config = resolve(&["--config", file.to_str().unwrap()]);
    assert_eq!(config.train.batch_size, 5);
    std::fs::remove_dir_all(&dir).unwrap();
    let bad = Program::try_parse_from(["program"])
        .unwrap()
        .run
        .resolve(RunConfig::default, |_| Ok(()));
    assert!(bad.is_ok());
    let unknown = Program::try_parse_from(["program", "--set", "train.no_such=1"])
        .unwrap()
        .run
        .resolve(RunConfig::default, |_| Ok(()));
    assert!(unknown.unwrap_err().to_string().contains("no_such"));
}
