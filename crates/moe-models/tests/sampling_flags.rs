//! `SamplingFlags::over`: each flag given overrides its setting, the others
//! stay the base's.

use moe_models::{Sampling, SamplingFlags};

#[test]
fn given_flags_override_their_settings_only() {
    let base = Sampling {
        temperature: 0.7,
        top_k: Some(50),
        top_p: Some(0.9),
        repetition_penalty: 1.1,
    };
    assert_eq!(SamplingFlags::default().over(base), base);
    let flags = SamplingFlags {
        temperature: Some(1.0),
        top_k: Some(1),
        ..SamplingFlags::default()
    };
    let got = flags.over(base);
    assert_eq!((got.temperature, got.top_k), (1.0, Some(1)));
    assert_eq!((got.top_p, got.repetition_penalty), (Some(0.9), 1.1));
}
