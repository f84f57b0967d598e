//! Full read of the live connections: the agent's read of its memory-mapped
//! `LIVE` array ([`LiveMap::read`], no syscall) against the hash map read it
//! replaced, one `BPF_MAP_LOOKUP_BATCH` walk (meterd's [`BatchReader`]),
//! and that against aya's per-key `HashMap::iter()` (two syscalls per key),
//! all in the same run.
//!
//! Two modes:
//! - synthetic (default): creates a hash map with the old `LIVE` layout
//!   (u64 cookie -> [`Counts`], preallocated, `max_entries` as the agent
//!   sized it) and a `BPF_F_MMAPABLE` array of [`LiveSlot`]s of the same
//!   `max_entries` (the new `LIVE`), fills both to each size (the array's
//!   slots spread over the whole array, as reuse leaves them) and times the
//!   reads, alternating; at the largest size it also sweeps the batch
//!   reader's chunk size, which shows what bounds the batch read;
//! - `--pinned PATH`: times the reads of a pinned map, e.g. a running
//!   agent's real `LIVE` with real connections in it (an array: the mapped
//!   read against a batch lookup of the same array).
//!
//! Prints one JSON object per line on stdout (read by `cargo xtask bench`)
//! and a human summary on stderr. Needs root (or CAP_BPF) to create maps.
//! Run on its own with `cargo bench -p meterd --bench mapread`; cargo passes
//! `--bench`, which is ignored.

use std::{
    os::fd::{AsFd as _, BorrowedFd},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, HashMap, IterableMap as _, Map, MapData};
use meterd::kernel::{slots::LiveMap, sys::BatchReader};
use meterd_common::{Counts, LiveSlot};

/// `BPF_F_MMAPABLE`.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// The chunk the agent's `LIVE` reader starts with (`Kernel::open`).
const AGENT_CHUNK: usize = 16_384;
/// `agent.max_connections` default: the `LIVE` map's `max_entries`. A hash
/// map's batch walk visits every bucket, so this matters as much as the fill.
const DEFAULT_MAX_ENTRIES: u32 = 262_144;
/// Chunk sizes swept at the largest synthetic size.
const CHUNK_SWEEP: [usize; 5] = [1024, 4096, 16_384, 65_536, 262_144];

struct Options {
    sizes: Vec<u32>,
    reps: usize,
    max_entries: u32,
    pinned: Option<String>,
    sweep: bool,
    mmap: bool,
}

fn parse_args() -> Result<Options> {
    let mut opts = Options {
        sizes: vec![1_000, 10_000, 50_000, 100_000],
        reps: 15,
        max_entries: DEFAULT_MAX_ENTRIES,
        pinned: None,
        sweep: true,
        mmap: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            // Added by `cargo bench`.
            "--bench" => {}
            "--sizes" => {
                opts.sizes = value("--sizes")?
                    .split(',')
                    .map(|s| s.trim().parse().context("--sizes: comma-separated counts"))
                    .collect::<Result<_>>()?;
            }
            "--reps" => opts.reps = value("--reps")?.parse().context("--reps")?,
            "--max-entries" => {
                opts.max_entries = value("--max-entries")?.parse().context("--max-entries")?;
            }
            "--pinned" => opts.pinned = Some(value("--pinned")?),
            "--no-sweep" => opts.sweep = false,
            "--no-mmap" => opts.mmap = false,
            other => bail!(
                "unknown argument {other}; usage: mapread [--sizes N,N..] [--reps R] \
                 [--max-entries M] [--no-sweep] [--no-mmap] | --pinned PATH [--reps R]"
            ),
        }
    }
    opts.reps = opts.reps.max(1);
    Ok(opts)
}

fn main() -> Result<()> {
    let opts = parse_args()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the map read benchmark creates BPF maps, which needs root: run it as root");
    }
    match &opts.pinned {
        Some(path) => pinned(path, opts.reps),
        None => synthetic(&opts),
    }
}

/// Times both reads on an existing pinned map.
fn pinned(path: &str, reps: usize) -> Result<()> {
    let data = MapData::from_pin(path).with_context(|| format!("opening pinned map {path}"))?;
    let info = data.info().context("map info")?;
    let max_entries = info.max_entries();
    let map = Map::from_map_data(data).context("map type")?;
    if let Map::Array(data) = map {
        // The agent's LIVE: the mapped read against a batch lookup of it.
        let live = LiveMap::new(&data).context("mapping the array")?;
        let mut out = Vec::new();
        let mut reader = BatchReader::<u32, LiveSlot>::new(AGENT_CHUNK);
        let mut slots = Vec::new();
        let (mut mapped, mut batch) = (Vec::new(), Vec::new());
        for rep in 0..=reps {
            let started = Instant::now();
            live.read(&mut out);
            let mmap_ms = ms(started);
            let started = Instant::now();
            reader
                .read_all(data.fd().as_fd(), &mut slots)
                .context("BPF_MAP_LOOKUP_BATCH")?;
            if rep > 0 {
                mapped.push(mmap_ms);
                batch.push(ms(started));
            }
        }
        emit_mmap("pinned", out.len(), max_entries, &mapped, &batch);
        return Ok(());
    }
    if !matches!(map, Map::HashMap(_)) {
        bail!("{path} is neither a BPF hash map nor an array");
    }
    let map: HashMap<MapData, u64, Counts> =
        HashMap::try_from(map).context("map layout is not u64 -> Counts")?;
    let (entries, batch, iter) = time_both(&map, AGENT_CHUNK, reps)?;
    emit("pinned", entries, max_entries, AGENT_CHUNK, &batch, &iter);
    Ok(())
}

fn synthetic(opts: &Options) -> Result<()> {
    let mut map: HashMap<MapData, u64, Counts> =
        HashMap::create(opts.max_entries, 0).context("creating a BPF hash map (u64 -> Counts)")?;
    let mut sizes = opts.sizes.clone();
    sizes.sort_unstable();
    let mut filled = 0u32;
    let mut slots = if opts.mmap {
        Some(Mapped::new(opts.max_entries)?)
    } else {
        None
    };
    for &size in &sizes {
        if size > opts.max_entries {
            bail!("size {size} exceeds --max-entries {}", opts.max_entries);
        }
        // Sizes ascend, so each step only adds entries.
        while filled < size {
            let key = cookie(filled);
            let value = Counts {
                last_ns: 0,
                bytes_out: u64::from(filled) * 1500,
                bytes_in: u64::from(filled),
            };
            map.insert(&key, &value, 0).context("filling the map")?;
            filled += 1;
        }
        let (entries, batch, iter) = time_both(&map, AGENT_CHUNK, opts.reps)?;
        emit(
            "synthetic",
            entries,
            opts.max_entries,
            AGENT_CHUNK,
            &batch,
            &iter,
        );
        if let Some(slots) = &mut slots {
            slots.against_batch(&map, size, opts)?;
        }
    }

    if opts.sweep {
        for chunk in CHUNK_SWEEP {
            let (entries, batch, iter) = time_batch_only(&map, chunk, opts.reps)?;
            emit("chunk", entries, opts.max_entries, chunk, &batch, &iter);
        }
    }
    Ok(())
}

/// The new `LIVE` against the old: an array of `max_entries` slots, filled
/// along with the hash map, so that at each size the agent's mapped read
/// of `size` held slots is timed against the batch read of the hash map
/// holding as many (the baseline), alternating.
struct Mapped {
    array: Array<MapData, LiveSlot>,
    filled: u32,
    max_entries: u32,
}

impl Mapped {
    fn new(max_entries: u32) -> Result<Self> {
        Ok(Self {
            array: Array::create(max_entries, BPF_F_MMAPABLE)
                .context("creating a BPF_F_MMAPABLE array of LIVE slots")?,
            filled: 0,
            max_entries,
        })
    }

    fn against_batch(
        &mut self,
        hash: &HashMap<MapData, u64, Counts>,
        size: u32,
        opts: &Options,
    ) -> Result<()> {
        while self.filled < size {
            // An odd stride is a bijection mod a power of two: the slots
            // are spread over the array, as taking and returning leaves
            // them, and the read has to pass over all of it anyway.
            let i = self.filled;
            let slot = i.wrapping_mul(7919) % self.max_entries;
            let value = LiveSlot {
                cookie: cookie(i),
                counts: Counts {
                    last_ns: 1,
                    bytes_out: u64::from(i) * 1500,
                    bytes_in: u64::from(i),
                },
            };
            self.array
                .set(slot, &value, 0)
                .context("filling the array")?;
            self.filled += 1;
        }
        let live = LiveMap::new(self.array.map()).context("mapping the array")?;
        let mut reader = BatchReader::<u64, Counts>::new(AGENT_CHUNK);
        let (mut hash_out, mut out) = (Vec::new(), Vec::new());
        let (mut mapped, mut batch) = (Vec::with_capacity(opts.reps), Vec::new());
        for rep in 0..=opts.reps {
            let started = Instant::now();
            live.read(&mut out);
            let mmap_ms = ms(started);
            let started = Instant::now();
            reader
                .read_all(fd_of(hash), &mut hash_out)
                .context("BPF_MAP_LOOKUP_BATCH")?;
            let batch_ms = ms(started);
            if out.len() != size as usize || hash_out.len() != out.len() {
                bail!(
                    "mapped read found {} of {size} slots, batch read {} entries",
                    out.len(),
                    hash_out.len()
                );
            }
            if rep > 0 {
                mapped.push(mmap_ms);
                batch.push(batch_ms);
            }
        }
        emit_mmap("mmap", out.len(), self.max_entries, &mapped, &batch);
        Ok(())
    }
}

/// A line of the mapped read against a batch read of the same size.
fn emit_mmap(mode: &str, entries: usize, max_entries: u32, mmap: &[f64], batch: &[f64]) {
    let line = serde_json::json!({
        "mode": mode,
        "entries": entries,
        "max_entries": max_entries,
        "chunk": AGENT_CHUNK,
        "batch_ms": batch,
        "iter_ms": [],
        "mmap_ms": mmap,
    });
    println!("{line}");
    eprintln!(
        "mapread: {mode:9} {entries:>7} entries: mapped {:8.3} ms, batch {:8.2} ms ({:.1}x)",
        median(mmap),
        median(batch),
        median(batch) / median(mmap)
    );
}

/// Socket-cookie-like keys: distinct, spread over the u64 range.
fn cookie(i: u32) -> u64 {
    // splitmix64's finaliser: a bijection, so keys never collide.
    let mut z = u64::from(i).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fd_of(map: &HashMap<MapData, u64, Counts>) -> BorrowedFd<'_> {
    map.map().fd().as_fd()
}

/// Alternates the two reads `reps` times after one warm-up of each;
/// returns the entry count and the milliseconds of each read.
fn time_both(
    map: &HashMap<MapData, u64, Counts>,
    chunk: usize,
    reps: usize,
) -> Result<(usize, Vec<f64>, Vec<f64>)> {
    let mut reader = BatchReader::<u64, Counts>::new(chunk);
    let mut out = Vec::new();
    let mut batch = Vec::with_capacity(reps);
    let mut iter = Vec::with_capacity(reps);
    let mut entries = 0;
    for rep in 0..=reps {
        let started = Instant::now();
        reader
            .read_all(fd_of(map), &mut out)
            .context("BPF_MAP_LOOKUP_BATCH")?;
        let batch_ms = ms(started);
        entries = out.len();

        let started = Instant::now();
        let per_key: Vec<(u64, Counts)> = map
            .iter()
            .collect::<Result<_, _>>()
            .context("HashMap::iter")?;
        let iter_ms = ms(started);
        if per_key.len().abs_diff(entries) > entries / 100 {
            eprintln!(
                "mapread: warning: batch read {entries} entries, per-key read {}: the map changed",
                per_key.len()
            );
        }
        if rep > 0 {
            batch.push(batch_ms);
            iter.push(iter_ms);
        }
    }
    Ok((entries, batch, iter))
}

/// Batch reads only, with a given chunk (the chunk sweep).
fn time_batch_only(
    map: &HashMap<MapData, u64, Counts>,
    chunk: usize,
    reps: usize,
) -> Result<(usize, Vec<f64>, Vec<f64>)> {
    let mut reader = BatchReader::<u64, Counts>::new(chunk);
    let mut out = Vec::new();
    let mut batch = Vec::with_capacity(reps);
    for rep in 0..=reps {
        let started = Instant::now();
        reader
            .read_all(fd_of(map), &mut out)
            .context("BPF_MAP_LOOKUP_BATCH")?;
        if rep > 0 {
            batch.push(ms(started));
        }
    }
    Ok((out.len(), batch, Vec::new()))
}

fn ms(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1e3
}

fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        f64::midpoint(v[mid - 1], v[mid])
    } else {
        v[mid]
    }
}

fn emit(mode: &str, entries: usize, max_entries: u32, chunk: usize, batch: &[f64], iter: &[f64]) {
    let line = serde_json::json!({
        "mode": mode,
        "entries": entries,
        "max_entries": max_entries,
        "chunk": chunk,
        "batch_ms": batch,
        "iter_ms": iter,
    });
    println!("{line}");
    if iter.is_empty() {
        eprintln!(
            "mapread: {mode:9} {entries:>7} entries, chunk {chunk:>6}: batch {:8.2} ms",
            median(batch)
        );
    } else {
        eprintln!(
            "mapread: {mode:9} {entries:>7} entries: batch {:8.2} ms, per-key iter {:8.2} ms \
             ({:.1}x)",
            median(batch),
            median(iter),
            median(iter) / median(batch)
        );
    }
}
