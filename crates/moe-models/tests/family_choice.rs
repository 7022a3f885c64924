//! `LmConfig::choose`: what a program's `--family` and `--preset` make of
//! a config file's (or the program's base) config.

use moe_models::{DecoderConfig, DecoderPreset, LmConfig, MakeMoeConfig, Preset};

fn chosen(mut config: LmConfig, family: Option<&str>, preset: Option<&str>) -> LmConfig {
    config.choose(family, preset).unwrap();
    config
}

#[test]
fn family_and_preset_choose_the_config() {
    let makemoe = LmConfig::MakeMoe(MakeMoeConfig::preset(Preset::MakeMoe));
    // Nothing chosen: the config as it is.
    assert_eq!(chosen(makemoe.clone(), None, None), makemoe);
    assert_eq!(chosen(makemoe.clone(), Some("makemoe"), None), makemoe);
    // Another family starts from its preset: the one named, else its default.
    let mixtral = LmConfig::Decoder(DecoderConfig::preset(DecoderPreset::Mixtral));
    assert_eq!(chosen(makemoe.clone(), Some("decoder"), None), mixtral);
    let deepseek = LmConfig::Decoder(DecoderConfig::preset(DecoderPreset::DeepseekV3));
    assert_eq!(
        chosen(makemoe.clone(), Some("decoder"), Some("deepseek_v3")),
        deepseek
    );
    assert_eq!(chosen(mixtral.clone(), Some("make_moe"), None), makemoe);
    // A decoder preset replaces the config but its vocabulary and context.
    let file = LmConfig::Decoder(DecoderConfig {
        vocab_size: 77,
        max_position_embeddings: 64,
        num_hidden_layers: 3,
        ..DecoderConfig::preset(DecoderPreset::Mixtral)
    });
    let LmConfig::Decoder(qwen) = chosen(file, None, Some("qwen3_moe")) else {
        panic!("still a decoder")
    };
    let want = DecoderConfig::preset(DecoderPreset::Qwen3Moe);
    assert_eq!((qwen.vocab_size, qwen.max_position_embeddings), (77, 64));
    assert_eq!(qwen.num_hidden_layers, want.num_hidden_layers);
    assert_eq!(qwen.router, want.router);
    // makeMoE's presets change its options, not its sizes.
    let mut sized = MakeMoeConfig::preset(Preset::MakeMoe);
    sized.n_layer = 3;
    let LmConfig::MakeMoe(textbook) = chosen(LmConfig::MakeMoe(sized), None, Some("default"))
    else {
        panic!("still makeMoE")
    };
    let mut want = MakeMoeConfig::preset(Preset::MakeMoe);
    want.apply_preset(Preset::Default);
    assert_eq!(textbook.n_layer, 3);
    assert_eq!(textbook.attention_scale, want.attention_scale);
}

#[test]
fn unknown_families_and_presets_are_errors_naming_the_choices() {
    let err = |config: LmConfig, family: Option<&str>, preset: Option<&str>| {
        let mut config = config;
        config.choose(family, preset).unwrap_err().to_string()
    };
    let makemoe = LmConfig::MakeMoe(MakeMoeConfig::default());
    let family = err(makemoe.clone(), Some("encoder"), None);
    assert!(family.contains("make_moe or decoder"), "{family}");
    let preset = err(makemoe, None, Some("mixtral"));
    assert!(preset.contains("mixtral"), "{preset}");
    let decoder = LmConfig::Decoder(DecoderConfig::default());
    let preset = err(decoder, None, Some("gpt5"));
    assert!(preset.contains("expected mixtral"), "{preset}");
}
