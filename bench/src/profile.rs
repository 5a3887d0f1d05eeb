//! Instructions and heap allocations per request and per chunk, counted by callgrind: the
//! gateway runs under `valgrind --tool=callgrind`; `callgrind_control --dump` cuts the
//! profile after the warm-up and after each measured batch, so every figure comes from
//! exactly one batch. Immune to the noise of a shared machine.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, bail};

use crate::{
    client::{Connection, InvokeCall, Target},
    mock::Scenario,
    procs::{self, Process, Wrapper},
    streams::{self, Transport},
};

/// The allocator's entry points, glibc's and mimalloc's: a call to one of them from outside
/// the set is one heap allocation (a `realloc` counts, as DHAT counts it).
const ALLOCATORS: &[&str] = &[
    "malloc",
    "calloc",
    "realloc",
    "memalign",
    "posix_memalign",
    "aligned_alloc",
    "mi_malloc",
    "mi_zalloc",
    "mi_realloc",
    "mi_malloc_aligned",
    "mi_zalloc_aligned",
    "mi_realloc_aligned",
];

pub struct Counts {
    pub instructions: f64,
    pub allocations: f64,
}

pub struct Profile {
    pub per_request: Counts,
    /// What one more chunk of a stream costs (SSE).
    pub per_chunk: Counts,
    /// `callgrind_annotate`'s top functions for the `/invoke` batch.
    pub invoke_top: String,
}

const REQUESTS: usize = 500;
const STREAMS: usize = 40;

pub async fn run(binary: &Path, mock: &Process) -> anyhow::Result<Profile> {
    let dir = std::env::temp_dir().join(format!("modelgate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let out = dir.join("callgrind.out");
    for old in dumps(&out)? {
        std::fs::remove_file(old)?;
    }
    let gateway = procs::start_gateway(binary, mock.addr, Wrapper::Callgrind(&out), "")?;
    let target = Target::Gateway(gateway.addr);
    let call = InvokeCall::new(target);
    let mut connection = Connection::open(gateway.addr).await?;
    for count in [100, REQUESTS] {
        for _ in 0..count {
            call.call(&mut connection).await?;
        }
        dump(&gateway)?;
    }
    let short = Scenario::paced(1, 0);
    let long = Scenario::paced(65, 0);
    streams::run_many(Transport::Sse, gateway.addr, short, STREAMS).await?;
    dump(&gateway)?;
    streams::run_many(Transport::Sse, gateway.addr, long, STREAMS).await?;
    dump(&gateway)?;
    drop(gateway);

    let files = dumps(&out)?;
    let [_, invoke_file, short_file, long_file] = files.as_slice() else {
        bail!("expected 4 callgrind dumps, found {files:?}");
    };
    let invoke = read_counts(invoke_file)?;
    let short = read_counts(short_file)?;
    let long = read_counts(long_file)?;
    let chunks = (STREAMS * 64) as f64;
    Ok(Profile {
        per_request: Counts {
            instructions: invoke.instructions / REQUESTS as f64,
            allocations: invoke.allocations / REQUESTS as f64,
        },
        per_chunk: Counts {
            instructions: (long.instructions - short.instructions) / chunks,
            allocations: (long.allocations - short.allocations) / chunks,
        },
        invoke_top: top_functions(invoke_file)?,
    })
}

fn dump(gateway: &Process) -> anyhow::Result<()> {
    let status = Command::new("callgrind_control")
        .arg("--dump")
        .arg(gateway.pid().to_string())
        .stdout(std::process::Stdio::null())
        .status()
        .context("running callgrind_control")?;
    if !status.success() {
        bail!("callgrind_control --dump failed");
    }
    // The dump is written by the gateway's next scheduled thread; give it a moment.
    std::thread::sleep(Duration::from_millis(500));
    Ok(())
}

/// The dump files callgrind wrote for `out` (`out.1`, `out.2`, …), in order.
fn dumps(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let prefix = format!(
        "{}.",
        out.file_name().expect("a file name").to_string_lossy()
    );
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(out.parent().expect("a directory"))?
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = path.file_name()?.to_string_lossy().into_owned();
            let number = name.strip_prefix(&prefix)?.parse().ok()?;
            Some((number, path))
        })
        .collect();
    found.sort();
    Ok(found.into_iter().map(|(_, path)| path).collect())
}

/// Total instructions, and calls into the allocator from outside it.
fn read_counts(file: &Path) -> anyhow::Result<Counts> {
    let text = std::fs::read_to_string(file)?;
    let mut names: HashMap<String, String> = HashMap::new();
    let mut name_of = |value: &str| -> String {
        // Callgrind compresses names: `(12) name` the first time, `(12)` afterwards.
        match value.split_once(' ') {
            Some((id, name)) if id.starts_with('(') => {
                names.insert(id.to_owned(), name.to_owned());
                name.to_owned()
            }
            _ if value.starts_with('(') => names.get(value).cloned().unwrap_or_default(),
            _ => value.to_owned(),
        }
    };
    let is_allocator = |name: &str| ALLOCATORS.contains(&name);
    let (mut caller, mut callee) = (String::new(), String::new());
    let mut instructions = 0.0;
    let mut allocations = 0.0;
    for line in text.lines() {
        if let Some(value) = line.strip_prefix("fn=") {
            caller = name_of(value);
        } else if let Some(value) = line.strip_prefix("cfn=") {
            callee = name_of(value);
        } else if let Some(value) = line.strip_prefix("calls=") {
            if is_allocator(&callee) && !is_allocator(&caller) {
                let count: f64 = value.split_whitespace().next().unwrap_or("0").parse()?;
                allocations += count;
            }
        } else if let Some(value) = line
            .strip_prefix("summary:")
            .or_else(|| line.strip_prefix("totals:"))
        {
            instructions = value.split_whitespace().next().unwrap_or("0").parse()?;
        }
    }
    Ok(Counts {
        instructions,
        allocations,
    })
}

/// The functions with the most instructions of their own, as `callgrind_annotate` lists them.
fn top_functions(file: &Path) -> anyhow::Result<String> {
    let output = Command::new("callgrind_annotate")
        .arg("--inclusive=no")
        .arg("--threshold=100")
        .arg(file)
        .output()
        .context("running callgrind_annotate")?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .lines()
        .skip_while(|line| !line.contains("file:function"))
        .skip(1)
        .filter(|line| !line.trim().is_empty())
        // The threads' entry points come first, charged with everything they run.
        .filter(|line| !line.contains("(100.0%)") && !line.contains("(99."))
        .take(25)
        .collect::<Vec<_>>()
        .join("\n"))
}
