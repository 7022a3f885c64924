use serde::{Deserialize, Serialize};
use tch::nn;

/// How the weight matrices of linear layers (and expert banks) are drawn.
/// Biases always follow PyTorch's `nn.Linear` default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum), value(rename_all = "lower"))]
#[non_exhaustive]
pub enum WeightInit {
    /// Kaiming He normal, fan-in mode, ReLU gain: N(0, 2 / fan_in)
    /// (He et al. 2015, arXiv 1502.01852). makeMoE's choice, because experts use ReLU.
    #[default]
    Kaiming,
    /// Xavier/Glorot normal: N(0, 2 / (fan_in + fan_out)) (Glorot & Bengio 2010),
    /// the usual transformer choice that the makeMoE tutorial suggests trying.
    Xavier,
}

impl WeightInit {
    /// The initialiser of a weight with the given fans.
    pub fn weight(self, fan_in: i64, fan_out: i64) -> nn::Init {
        let stdev = match self {
            WeightInit::Kaiming => (2.0 / fan_in as f64).sqrt(),
            WeightInit::Xavier => (2.0 / (fan_in + fan_out) as f64).sqrt(),
        };
        nn::Init::Randn { mean: 0.0, stdev }
    }

    /// PyTorch's default bias initialiser for a layer of this fan-in.
    pub fn bias(fan_in: i64) -> nn::Init {
        let bound = 1.0 / (fan_in as f64).sqrt();
        nn::Init::Uniform {
            lo: -bound,
            up: bound,
        }
    }
}

impl std::str::FromStr for WeightInit {
    type Err = crate::MoeError;

    fn from_str(s: &str) -> crate::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "kaiming" | "he" => Ok(WeightInit::Kaiming),
            "xavier" | "glorot" => Ok(WeightInit::Xavier),
            other => Err(crate::MoeError::config(format!(
                "unknown init `{other}`: expected kaiming or xavier"
            ))),
        }
    }
}

/// A `Linear(fan_in -> fan_out)` whose weight follows `init` and whose bias
/// (when present) follows PyTorch's default.
pub fn linear(p: nn::Path, fan_in: i64, fan_out: i64, bias: bool, init: WeightInit) -> nn::Linear {
    let cfg = nn::LinearConfig {
        ws_init: init.weight(fan_in, fan_out),
        bs_init: bias.then(|| WeightInit::bias(fan_in)),
        bias,
    };
    nn::linear(p, fan_in, fan_out, cfg)
}
