use crate::{MoeError, Result};
use serde::{Deserialize, Serialize};
use std::str::FromStr;
use tch::Device;

/// Where to run: the first GPU when there is one (`auto`), the CPU, or CUDA
/// (an error where no GPU is usable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum), value(rename_all = "lower"))]
#[non_exhaustive]
pub enum DeviceChoice {
    #[default]
    /// The first CUDA device when libtorch sees one, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// The first CUDA device; an error where none is usable.
    Cuda,
}

impl DeviceChoice {
    /// Resolves the choice to a libtorch device.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceChoice::Auto => Ok(Device::cuda_if_available()),
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
            DeviceChoice::Cuda => Err(MoeError::DeviceUnavailable(
                "`cuda` was asked for but libtorch sees no CUDA device \
                 (no GPU, no driver, or a CPU-only libtorch); use --device cpu or auto"
                    .to_string(),
            )),
        }
    }
}

/// The name [`DeviceChoice::from_str`] reads back (`auto`, `cpu`, `cuda`).
impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceChoice::Auto => "auto",
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
        })
    }
}

impl FromStr for DeviceChoice {
    type Err = MoeError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda),
            other => Err(MoeError::DeviceUnavailable(format!(
                "unknown device `{other}`: expected one of auto, cpu, cuda"
            ))),
        }
    }
}
