//! Choosing the compute device: `auto`, `cpu`, `cuda[:N]` or `metal`.
//!
//! GPU support is compiled in only with the `cuda` or `metal` cargo features, so a default
//! build never needs a GPU toolkit; asking for a device the build lacks is a clear error.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A requested device, as given on a command line or in a config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceChoice {
    /// The first CUDA GPU if this build and machine have one, else Metal, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA GPU number N.
    Cuda(usize),
    /// The default Metal device (macOS).
    Metal,
}

impl FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            "metal" => Ok(DeviceChoice::Metal),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                _ => Err(Error::Device(format!(
                    "unknown device `{other}`: expected auto, cpu, cuda, cuda:N or metal"
                ))),
            },
        }
    }
}

impl TryFrom<String> for DeviceChoice {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<DeviceChoice> for String {
    fn from(d: DeviceChoice) -> String {
        d.to_string()
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceChoice::Metal => f.write_str("metal"),
        }
    }
}

impl DeviceChoice {
    /// Opens the device, or explains why it cannot be used.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Auto => {
                if candle_core::utils::cuda_is_available() {
                    Ok(Device::new_cuda(0)?)
                } else if candle_core::utils::metal_is_available() {
                    Ok(Device::new_metal(0)?)
                } else {
                    Ok(Device::Cpu)
                }
            }
            DeviceChoice::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(Error::Device(
                        "this build has no CUDA support: rebuild with `--features cuda` (needs nvcc at build time)".into(),
                    ));
                }
                Device::new_cuda(n).map_err(|e| Error::Device(format!("cannot open cuda:{n}: {e}")))
            }
            DeviceChoice::Metal => {
                if !candle_core::utils::metal_is_available() {
                    return Err(Error::Device(
                        "this build has no Metal support: rebuild with `--features metal` (macOS only)".into(),
                    ));
                }
                Device::new_metal(0).map_err(|e| Error::Device(format!("cannot open metal: {e}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_choice() {
        for (s, d) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda:3", DeviceChoice::Cuda(3)),
            ("metal", DeviceChoice::Metal),
        ] {
            assert_eq!(s.parse::<DeviceChoice>().unwrap(), d);
            assert_eq!(d.to_string(), s);
        }
        assert_eq!(
            "cuda".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(0)
        );
        let err = "gpu".parse::<DeviceChoice>().unwrap_err().to_string();
        assert!(err.contains("unknown device `gpu`"), "{err}");
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn cpu_opens_and_missing_backends_explain_themselves() {
        assert!(DeviceChoice::Cpu.open().unwrap().is_cpu());
        if !candle_core::utils::cuda_is_available() {
            let err = DeviceChoice::Cuda(0).open().unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
        if !candle_core::utils::metal_is_available() {
            let err = DeviceChoice::Metal.open().unwrap_err().to_string();
            assert!(err.contains("--features metal"), "{err}");
        }
    }
}
