//! The results of one `cargo xtask bench` run: every measure with the
//! baseline measured in the same run and their ratio, written as
//! `results.json` (everything, including the raw samples) and `results.md`
//! (the table, the notes, and the command that reproduces them).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::Serialize;
use serde_json::Value;

/// One row of the results table.
#[derive(Debug, Clone, Serialize)]
pub struct Measure {
    /// The `--only` name of the bench that measured it.
    pub bench: &'static str,
    pub name: String,
    pub value: f64,
    pub unit: String,
    /// What the baseline is (same run), e.g. "programs not attached".
    pub baseline_name: String,
    pub baseline: Option<f64>,
    pub ratio: Option<f64>,
    /// What the ratio divides, e.g. "metered / not attached".
    pub ratio_meaning: String,
    /// The goal, as the issue states it.
    pub target: String,
    /// Whether the goal was met; `None` when it could not be judged.
    pub met: Option<bool>,
    /// How it was measured, by how much a target was missed and what bounds it.
    pub note: String,
}

/// Everything a run produced.
#[derive(Debug, Default, Serialize)]
pub struct Results {
    /// The command line that reproduces this run.
    pub command: String,
    pub started_at: String,
    pub git: String,
    pub host: Value,
    pub quick: bool,
    pub benches: Vec<String>,
    pub duration_s: f64,
    pub measures: Vec<Measure>,
    /// Raw samples per bench, for re-analysis.
    pub details: serde_json::Map<String, Value>,
    /// SVG plots, relative to the results dir.
    pub plots: Vec<String>,
    /// Benches that failed, with why; the others still report.
    pub errors: Vec<String>,
}

impl Results {
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        let json = dir.join("results.json");
        fs::write(
            &json,
            serde_json::to_string_pretty(self).context("serialising results")?,
        )
        .with_context(|| format!("writing {}", json.display()))?;
        let md = dir.join("results.md");
        fs::write(&md, self.markdown()).with_context(|| format!("writing {}", md.display()))?;
        Ok((json, md))
    }

    /// The results table alone (also printed at the end of a run).
    pub fn table(&self) -> String {
        let mut s = String::new();
        s.push_str("| measure | result | baseline (same run) | ratio | target | met |\n");
        s.push_str("|---|---|---|---|---|---|\n");
        for m in &self.measures {
            let baseline = match m.baseline {
                Some(b) => format!("{} {} ({})", num(b), m.unit, m.baseline_name),
                None => m.baseline_name.clone(),
            };
            let ratio = m.ratio.map_or_else(
                || "-".to_owned(),
                |r| format!("{} ({})", num(r), m.ratio_meaning),
            );
            let met = match m.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "n/a",
            };
            let _ = writeln!(
                s,
                "| {} | {} {} | {} | {} | {} | {} |",
                m.name,
                num(m.value),
                m.unit,
                baseline,
                ratio,
                m.target,
                met
            );
        }
        s
    }

    fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# meterd benchmark results\n");
        let _ = writeln!(
            s,
            "Reproduce (as root, from the repository): `{}`\n",
            self.command
        );
        let _ = writeln!(
            s,
            "Run {} on {}; git {}; mode {}; {:.0} s.\n",
            self.started_at,
            self.host_line(),
            self.git,
            if self.quick {
                "--quick (smoke run: fewer, shorter samples)"
            } else {
                "full"
            },
            self.duration_s
        );
        s.push_str(&self.table());
        s.push_str("\n## Notes\n\n");
        for m in &self.measures {
            if !m.note.is_empty() {
                let _ = writeln!(s, "- **{}**: {}", m.name, m.note);
            }
        }
        if !self.errors.is_empty() {
            s.push_str("\n## Benches that failed\n\n");
            for e in &self.errors {
                let _ = writeln!(s, "- {e}");
            }
        }
        if !self.plots.is_empty() {
            s.push_str("\n## Plots\n\n");
            for p in &self.plots {
                let _ = writeln!(s, "![{p}]({p})");
            }
        }
        s.push_str("\nRaw samples: results.json (`details`).\n");
        s
    }

    fn host_line(&self) -> String {
        format!(
            "{} ({} CPUs, kernel {})",
            self.host["cpu_model"].as_str().unwrap_or("?"),
            self.host["cpus"],
            self.host["kernel"].as_str().unwrap_or("?")
        )
    }
}

/// A number with about three significant digits.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        return x.to_string();
    }
    let a = x.abs();
    if a == 0.0 {
        "0".to_owned()
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else if a >= 0.01 {
        format!("{x:.3}")
    } else {
        format!("{x:.2e}")
    }
}
