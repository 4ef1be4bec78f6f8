//! The redirection as text: the `iptables-restore` input that installs it, the
//! input that removes exactly what is there (read from `iptables-save`), and the
//! `ip rule` / `ip route` arguments and checks for the policy routing.

use std::fmt::Write;

use super::{Mark, RedirectConfig};

/// Our chains, per table: jumped to from PREROUTING and OUTPUT.
pub const PREROUTING_CHAIN: &str = "AMBIT_PRERT";
pub const OUTPUT_CHAIN: &str = "AMBIT_OUTPUT";
const TABLES: [&str; 2] = ["mangle", "nat"];
const CHAINS: [&str; 2] = [PREROUTING_CHAIN, OUTPUT_CHAIN];

/// The `iptables-restore --noflush` input that installs the redirection.
pub fn render_install(cfg: &RedirectConfig) -> String {
    let (pm, cm, mask) = (cfg.proxy_mark, cfg.conn_mark, cfg.mark_mask);
    let mut out = String::new();
    let mut line = |l: String| {
        out.push_str(&l);
        out.push('\n');
    };
    for table in TABLES {
        line(format!("*{table}"));
        line(format!(":{PREROUTING_CHAIN} - [0:0]"));
        line(format!(":{OUTPUT_CHAIN} - [0:0]"));
        line(format!("-A PREROUTING -j {PREROUTING_CHAIN}"));
        line(format!("-A OUTPUT -j {OUTPUT_CHAIN}"));
        if table == "mangle" {
            // Connections ztunnel opened into the pod (marked sockets) get a
            // connmark, restored on the pod's replies so they route back to ztunnel.
            line(format!(
                "-A {PREROUTING_CHAIN} -m mark --mark {pm}/{mask} -j CONNMARK --set-xmark {cm}/{mask}"
            ));
            line(format!(
                "-A {OUTPUT_CHAIN} -m connmark --mark {cm}/{mask} -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff"
            ));
        } else {
            line(format!("-A {PREROUTING_CHAIN} -i lo -j RETURN"));
            line(format!(
                "-A {PREROUTING_CHAIN} -m mark --mark {pm}/{mask} -j RETURN"
            ));
            line(format!(
                "-A {PREROUTING_CHAIN} -p tcp --dport {} -j RETURN",
                cfg.hbone_port
            ));
            line(format!(
                "-A {PREROUTING_CHAIN} -p tcp -j REDIRECT --to-ports {}",
                cfg.inbound_port
            ));
            line(format!(
                "-A {OUTPUT_CHAIN} -m mark --mark {pm}/{mask} -j RETURN"
            ));
            line(format!("-A {OUTPUT_CHAIN} -d 127.0.0.0/8 -j RETURN"));
            line(format!(
                "-A {OUTPUT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
                cfg.outbound_port
            ));
        }
        line("COMMIT".to_owned());
    }
    out
}

/// What of ours one table of an `iptables-save` dump holds.
#[derive(Debug, Default, PartialEq, Eq)]
struct TableState {
    /// Rules elsewhere that jump into our chains, as `iptables-save` wrote them.
    jumps: Vec<String>,
    /// Our chains that exist.
    chains: Vec<&'static str>,
}

fn our_chain(name: &str) -> Option<&'static str> {
    CHAINS.into_iter().find(|c| *c == name)
}

/// Reads `table` of an `iptables-save` dump.
fn table_state(saved: &str, table: &str) -> TableState {
    let mut state = TableState::default();
    let mut inside = false;
    for line in saved.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('*') {
            inside = name == table;
            continue;
        }
        if !inside {
            continue;
        }
        if line == "COMMIT" {
            inside = false;
        } else if let Some(decl) = line.strip_prefix(':') {
            if let Some(chain) = decl.split_whitespace().next().and_then(our_chain) {
                state.chains.push(chain);
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let mut words = rule.split_whitespace();
            let from = words.next().unwrap_or_default();
            let target = rule.split(" -j ").nth(1).map(str::trim).and_then(our_chain);
            if our_chain(from).is_none() && target.is_some() {
                state.jumps.push(rule.to_owned());
            }
        }
    }
    state
}

/// The `iptables-restore --noflush` input that removes our jumps and chains as
/// found in `saved` (an `iptables-save` dump), leaving every other rule alone.
/// `None` when nothing of ours is there.
pub fn render_removal(saved: &str) -> Option<String> {
    let mut out = String::new();
    for table in TABLES {
        let state = table_state(saved, table);
        if state.jumps.is_empty() && state.chains.is_empty() {
            continue;
        }
        let _ = writeln!(out, "*{table}");
        for jump in &state.jumps {
            let _ = writeln!(out, "-D {jump}");
        }
        for chain in &state.chains {
            let _ = writeln!(out, "-F {chain}");
            let _ = writeln!(out, "-X {chain}");
        }
        let _ = writeln!(out, "COMMIT");
    }
    (!out.is_empty()).then_some(out)
}

/// True when `saved` holds both our chains in both tables, each jumped to and
/// holding exactly the rules [`render_install`] puts there for `cfg`, in order
/// (compared as `iptables-save` prints them, see [`normalise_rule`]): a flushed
/// or edited chain is not the redirection.
pub fn rules_present(cfg: &RedirectConfig, saved: &str) -> bool {
    let wanted = render_install(cfg);
    TABLES.into_iter().all(|table| {
        let state = table_state(saved, table);
        let jumps_into = |chain: &str| {
            state
                .jumps
                .iter()
                .any(|j| j.split(" -j ").nth(1).map(str::trim) == Some(chain))
        };
        CHAINS.into_iter().all(|c| {
            state.chains.contains(&c)
                && jumps_into(c)
                && chain_rules(saved, table, c) == chain_rules(&wanted, table, c)
        })
    })
}

/// The rules of `chain` in `table` of an `iptables-save` or `iptables-restore`
/// text, in order, each normalised.
fn chain_rules(text: &str, table: &str, chain: &str) -> Vec<Vec<String>> {
    let mut rules = Vec::new();
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('*') {
            inside = name == table;
        } else if line == "COMMIT" {
            inside = false;
        } else if inside
            && let Some(rule) = line.strip_prefix("-A ")
            && rule.split_whitespace().next() == Some(chain)
        {
            rules.push(normalise_rule(rule));
        }
    }
    rules
}

/// A rule's words as `iptables-save` prints them, whatever way they were
/// written: without the `-m tcp` it adds for `--dport`, and with every mark as
/// `value/mask` (it leaves out a full mask: `--mark 0x539`).
fn normalise_rule(rule: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut words = rule.split_whitespace().peekable();
    while let Some(word) = words.next() {
        if word == "-m" && words.peek() == Some(&"tcp") {
            words.next();
            continue;
        }
        out.push(word.to_owned());
        if matches!(word, "--mark" | "--set-xmark")
            && let Some(value) = words.next()
        {
            out.push(match parse_fwmark(value) {
                Some((mark, mask)) => format!("{mark}/{mask}"),
                None => value.to_owned(),
            });
        }
    }
    out
}

/// `ip rule <verb> ...` arguments for our fwmark rule (`verb` is `add` or `del`).
pub fn ip_rule_args(cfg: &RedirectConfig, verb: &str) -> Vec<String> {
    vec![
        "rule".into(),
        verb.into(),
        "fwmark".into(),
        format!("{}/{}", cfg.conn_mark, cfg.mark_mask),
        "pref".into(),
        cfg.rule_priority.to_string(),
        "lookup".into(),
        cfg.route_table.to_string(),
    ]
}

/// `ip route <verb> ...` arguments for our local route (`replace` or `del`).
pub fn ip_route_args(cfg: &RedirectConfig, verb: &str) -> Vec<String> {
    ["route", verb, "local", "0.0.0.0/0", "dev", "lo", "table"]
        .into_iter()
        .map(String::from)
        .chain([cfg.route_table.to_string()])
        .collect()
}

/// Is our rule in `ip rule show` output? The mark is compared as numbers:
/// `ip` prints `fwmark 0x111` without the mask when it is 0xffffffff.
pub fn ip_rule_present(cfg: &RedirectConfig, shown: &str) -> bool {
    let prefix = format!("{}:", cfg.rule_priority);
    let ours = (cfg.conn_mark, cfg.mark_mask);
    let table = cfg.route_table.to_string();
    shown.lines().any(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        words.first() == Some(&prefix.as_str())
            && words
                .windows(2)
                .any(|w| w[0] == "fwmark" && parse_fwmark(w[1]) == Some(ours))
            && words.ends_with(&["lookup", table.as_str()])
    })
}

/// `0x111/0xfff` or `0x111` (mask 0xffffffff), as `ip rule` prints a fwmark and
/// `iptables-save` a mark.
fn parse_fwmark(word: &str) -> Option<(Mark, Mark)> {
    let (mark, mask) = word.split_once('/').unwrap_or((word, "0xffffffff"));
    Some((mark.parse().ok()?, mask.parse().ok()?))
}

/// Is our route in `ip route show table <t>` output?
pub fn ip_route_present(shown: &str) -> bool {
    shown.lines().any(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        words.starts_with(&["local", "default", "dev", "lo"])
            || words.starts_with(&["local", "0.0.0.0/0", "dev", "lo"])
    })
}

#[cfg(test)]
#[path = "rules_tests.rs"]
mod tests;
