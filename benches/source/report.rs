//! The benchmark's result: two markdown tables (CPU and its ratios; drain
//! and peak RSS), the targets checked on what was measured, and the
//! bridge runs that fell short.

use crate::{Measured, Row, Who};

fn table(head: &[String], right: &[bool], rows: &[Vec<String>]) {
    println!("\n| {} |", head.join(" | "));
    let rule: Vec<&str> = right
        .iter()
        .map(|&r| if r { "---:" } else { "---" })
        .collect();
    println!("|{}|", rule.join("|"));
    for r in rows {
        println!("| {} |", r.join(" | "));
    }
}

/// agent / bridge CPU; an upper bound when the bridge fell short (its CPU
/// is then a lower bound).
fn ratio(a: &Measured, b: &Measured) -> String {
    let (x, y) = (a.cpu_us_per_event, b.cpu_us_per_event);
    if !(y > 0.0 && x.is_finite() && y.is_finite() && a.complete()) {
        return "–".into();
    }
    let bound = if b.complete() { "" } else { "≤ " };
    format!("{bound}{:.2}", x / y)
}

fn cell_columns(r: &Row) -> Vec<String> {
    vec![
        r.cell.sessions.to_string(),
        r.cell.events.to_string(),
        r.cell.sinks.name().to_string(),
    ]
}

pub fn print(rows: &[Row], bridges: &[Who]) {
    let mut head: Vec<String> = ["sessions", "events", "sinks"].map(String::from).into();
    let runs: Vec<&str> = std::iter::once("agent")
        .chain(bridges.iter().map(|b| b.name()))
        .collect();
    head.push(format!("libvirtd events/s ({} run)", runs.join(" / ")));
    head.push("agent CPU µs/event".into());
    for b in bridges {
        head.push(format!("{} CPU µs/event", b.name()));
    }
    for b in bridges {
        head.push(format!("CPU agent/{}", b.name()));
    }
    head.push("agent notes".into());
    let mut right = vec![true; head.len()];
    right[2] = false;
    *right.last_mut().unwrap() = false;
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut c = cell_columns(r);
            let runs = std::iter::once(&r.agent).chain(&r.bridges);
            let rates: Vec<String> = runs.map(|m| format!("{:.0}", m.libvirtd_rate)).collect();
            c.push(rates.join(" / "));
            c.push(r.agent.cpu());
            c.extend(r.bridges.iter().map(Measured::cpu));
            c.extend(r.bridges.iter().map(|b| ratio(&r.agent, b)));
            c.push(if r.agent.notes.is_empty() {
                "–".into()
            } else {
                r.agent.notes.clone()
            });
            c
        })
        .collect();
    table(&head, &right, &body);

    let mut head: Vec<String> = ["sessions", "events", "sinks"].map(String::from).into();
    for w in &runs {
        head.push(format!("{w} drain s"));
    }
    for w in &runs {
        head.push(format!("{w} RSS MiB"));
    }
    let mut right = vec![true; head.len()];
    right[2] = false;
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut c = cell_columns(r);
            let runs: Vec<&Measured> = std::iter::once(&r.agent).chain(&r.bridges).collect();
            c.extend(runs.iter().map(|m| m.drain()));
            c.extend(runs.iter().map(|m| format!("{:.1}", m.peak_rss_mib)));
            c
        })
        .collect();
    table(&head, &right, &body);

    targets(rows, bridges);

    let short: Vec<String> = rows
        .iter()
        .flat_map(|r| r.bridges.iter().map(move |b| (r, b)))
        .filter(|(_, b)| !b.complete())
        .map(|(r, b)| format!("  {} {}: drain {}", b.who.label(), r.cell.name(), b.drain()))
        .collect();
    if !short.is_empty() {
        println!(
            "\nbridge runs short of every load event (their result, not a failure):\n{}",
            short.join("\n")
        );
    }
}

/// The agent's targets, checked on what was measured.
fn targets(rows: &[Row], bridges: &[Who]) {
    let cells = rows.len();
    let cpu_ok = rows
        .iter()
        .filter(|r| r.agent.cpu_us_per_event <= 100.0)
        .count();
    // Against one bridge: cells where the agent spent ≥ 4× less CPU, and
    // the range of agent / bridge.
    let against = |who: Who| {
        let pairs: Vec<(&Measured, &Measured)> = rows
            .iter()
            .filter_map(|r| Some((&r.agent, r.bridges.iter().find(|b| b.who == who)?)))
            .collect();
        let ok = pairs
            .iter()
            .filter(|(a, b)| a.cpu_us_per_event * 4.0 <= b.cpu_us_per_event)
            .count();
        let ratios: Vec<f64> = pairs
            .iter()
            .map(|(a, b)| a.cpu_us_per_event / b.cpu_us_per_event)
            .filter(|x| x.is_finite())
            .collect();
        let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let range = if ratios.is_empty() {
            "–".to_string()
        } else {
            format!("{lo:.2}–{hi:.2}")
        };
        (ok, pairs.len(), range)
    };
    let vs = |who: Who, what: &str| {
        if !bridges.contains(&who) {
            return format!("{what}: not run (BENCH_BRIDGES)");
        }
        let (ok, n, range) = against(who);
        format!(
            "{what}: {ok} of {n} cells (agent/{} CPU {range})",
            who.name()
        )
    };
    let big: Vec<&Row> = rows.iter().filter(|r| r.cell.events >= 16000).collect();
    let drain_ok = big.iter().filter(|r| r.agent.drain_s <= 0.2).count();
    let four: Vec<&Row> = rows.iter().filter(|r| r.cell.sessions == 4).collect();
    let four_ok = four
        .iter()
        .filter(|r| r.agent.notes.is_empty() && r.agent.drain_s <= 0.2)
        .count();
    println!("\ntargets (agent):");
    println!("- CPU ≤ 100 µs/event: {cpu_ok} of {cells} cells");
    println!(
        "- {}",
        vs(
            Who::Awaited,
            "≥ 4× less CPU than the awaited bridge (the issue's baseline)"
        )
    );
    println!(
        "- {}",
        vs(
            Who::Pipelined,
            "for comparison, ≥ 4× less CPU than the pipelined bridge"
        )
    );
    println!(
        "- drain ≤ 0.2 s after 16,000 events: {drain_ok} of {}",
        big.len()
    );
    println!(
        "- 4 sessions kept up (drain ≤ 0.2 s, no gap or overflow): {four_ok} of {}",
        four.len()
    );
}
