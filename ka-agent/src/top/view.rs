//! What `top` shows: rows from the API, sorting, filtering, the rates from
//! `/metrics`, and drawing it all into whatever width the terminal has
//! (80 columns at least: low-priority columns go first).

use std::time::Instant;

use ratatui::{
    Frame,
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Cell, Paragraph, Row as TableRow, Table, TableState},
};

/// One connection as the view shows it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    pub class: String,
    /// Zombie kind, or the at-risk reasons (`keepalive_disabled>3s`).
    pub why: String,
    pub process: String,
    pub pod: String,
    pub local: String,
    pub remote: String,
    pub state: String,
    pub idle_secs: f64,
    pub keepalive: String,
    pub probes_sent: u64,
    pub unanswered: u64,
}

impl Row {
    /// From one element of `/api/v1/connections` (docs/api.md); fields a
    /// future agent drops are shown empty.
    pub fn from_json(c: &serde_json::Value) -> Option<Self> {
        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
        let ka = &c["keepalive"];
        let keepalive = if ka["enabled"].as_bool().unwrap_or(false) {
            format!(
                "on {}/{}\u{d7}{}",
                seconds(ka["idle_secs"].as_f64().unwrap_or(0.0)),
                seconds(ka["interval_secs"].as_f64().unwrap_or(0.0)),
                ka["probes"].as_u64().unwrap_or(0)
            )
        } else {
            "off".to_owned()
        };
        let why = match c["zombie"].as_str() {
            Some(kind) => kind.to_owned(),
            None => c["at_risk"]
                .as_array()
                .map(|risks| {
                    risks
                        .iter()
                        .map(|r| {
                            format!(
                                "{}>{}",
                                r["reason"].as_str().unwrap_or_default(),
                                r["idle_timeout"].as_str().unwrap_or_default()
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default(),
        };
        // The error a dying connection survives (a router's unreachable
        // answering its retransmissions) says why it is dying.
        let why = match (c["soft_error"].as_str(), why.is_empty()) {
            (Some(soft_error), true) => soft_error.to_owned(),
            (Some(soft_error), false) => format!("{why} ({soft_error})"),
            (None, _) => why,
        };
        Some(Self {
            class: c["class"].as_str()?.to_owned(),
            why,
            process: text(&c["comm"]),
            // `namespace/pod` (the API's `pod` object, in Kubernetes).
            pod: match (c["pod"]["namespace"].as_str(), c["pod"]["pod"].as_str()) {
                (Some(namespace), Some(pod)) if !pod.is_empty() => format!("{namespace}/{pod}"),
                _ => String::new(),
            },
            local: text(&c["local"]),
            remote: text(&c["remote"]),
            state: text(&c["state"]),
            idle_secs: c["idle_secs"].as_f64().unwrap_or(0.0),
            keepalive,
            probes_sent: ka["probes_sent"].as_u64().unwrap_or(0),
            unanswered: ka["unanswered"].as_u64().unwrap_or(0),
        })
    }

    fn rank(&self) -> u8 {
        match self.class.as_str() {
            "zombie" => 0,
            "probing" => 1,
            "at_risk" => 2,
            "ok" => 3,
            _ => 4,
        }
    }

    fn matches(&self, needle: &str) -> bool {
        [
            &self.process,
            &self.pod,
            &self.local,
            &self.remote,
            &self.state,
            &self.class,
            &self.why,
        ]
        .iter()
        .any(|field| field.to_ascii_lowercase().contains(needle))
    }
}

/// A whole number of seconds, in the largest unit that divides it.
fn seconds(secs: f64) -> String {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "keepalive settings are small non-negative whole seconds"
    )]
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// Idle time, short: `0.4s`, `12s`, `5m03s`, `2h10m`, `3d04h`.
pub fn idle(secs: f64) -> String {
    if secs < 10.0 {
        return format!("{:.1}s", secs.max(0.0));
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "idle times are non-negative and far below 2^52 s"
    )]
    let s = secs as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn short_state(state: &str) -> &str {
    if state == "ESTABLISHED" {
        "ESTAB"
    } else {
        state
    }
}

/// Counter sums from `/metrics` behind the rates.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Totals {
    pub probes: f64,
    pub resets: f64,
    pub zombies: f64,
}

impl Totals {
    pub fn from_metrics(text: &str) -> Self {
        let mut totals = Self::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let name = series.split('{').next().unwrap_or_default();
            match name {
                "ka_keepalive_probes_total" => totals.probes += value,
                "ka_resets_received_total" | "ka_resets_sent_total" => totals.resets += value,
                "ka_zombies_total" => totals.zombies += value,
                _ => {}
            }
        }
        totals
    }
}

/// The processes holding dead connections (`ka_dead_connections_held` by
/// `comm`), most first: `top` lists no closed connection, so it names them
/// in its header.
pub fn held_by_process(text: &str) -> Vec<(String, u64)> {
    let mut by_comm: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Some(labels) = line.strip_prefix("ka_dead_connections_held{") else {
            continue;
        };
        let Some((labels, value)) = labels.rsplit_once("} ") else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        if value < 1.0 {
            continue;
        }
        let comm = label(labels, "comm").unwrap_or_default();
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a gauge of held sockets: a small whole number, at least 1 here"
        )]
        let count = value as u64;
        *by_comm.entry(comm).or_default() += count;
    }
    let mut held: Vec<(String, u64)> = by_comm.into_iter().collect();
    held.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    held
}

/// The value of label `name` in an exposition's label list
/// (`a="x",b="y\"z"`), unescaped.
fn label(labels: &str, name: &str) -> Option<String> {
    let mut rest = labels;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((at, c)) = chars.next() {
            match c {
                '"' => {
                    end = Some(at);
                    break;
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, escaped)) => value.push(escaped),
                    None => return None,
                },
                other => value.push(other),
            }
        }
        let end = end?;
        if key.trim_start_matches(',') == name {
            return Some(value);
        }
        rest = after.get(end + 1..).unwrap_or_default();
    }
    None
}

/// Per-second rates between two readings.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rates {
    pub probes: f64,
    pub resets: f64,
}

impl Rates {
    pub fn between(before: (Totals, Instant), after: (Totals, Instant)) -> Option<Self> {
        let secs = after.1.checked_duration_since(before.1)?.as_secs_f64();
        if secs <= 0.0 {
            return None;
        }
        // A restarted agent starts from zero: no negative rates.
        Some(Self {
            probes: (after.0.probes - before.0.probes).max(0.0) / secs,
            resets: (after.0.resets - before.0.resets).max(0.0) / secs,
        })
    }
}

/// The sort column (`s` cycles, `r` reverses).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortKey {
    /// Class (zombies first), then longest idle: the API's order.
    #[default]
    Worst,
    Idle,
    Process,
    Remote,
    Local,
    State,
    Probes,
}

impl SortKey {
    #[must_use]
    pub const fn next(self) -> Self {
        match self {
            Self::Worst => Self::Idle,
            Self::Idle => Self::Process,
            Self::Process => Self::Remote,
            Self::Remote => Self::Local,
            Self::Local => Self::State,
            Self::State => Self::Probes,
            Self::Probes => Self::Worst,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Worst => "worst",
            Self::Idle => "idle",
            Self::Process => "process",
            Self::Remote => "remote",
            Self::Local => "local",
            Self::State => "state",
            Self::Probes => "probes",
        }
    }

    fn compare(self, a: &Row, b: &Row) -> std::cmp::Ordering {
        let worst = || {
            a.rank()
                .cmp(&b.rank())
                .then(b.idle_secs.total_cmp(&a.idle_secs))
        };
        match self {
            Self::Worst => worst(),
            Self::Idle => b.idle_secs.total_cmp(&a.idle_secs),
            Self::Process => a.process.cmp(&b.process).then_with(worst),
            Self::Remote => a.remote.cmp(&b.remote).then_with(worst),
            Self::Local => a.local.cmp(&b.local).then_with(worst),
            Self::State => a.state.cmp(&b.state).then_with(worst),
            Self::Probes => (b.unanswered, b.probes_sent)
                .cmp(&(a.unanswered, a.probes_sent))
                .then_with(worst),
        }
    }
}

/// Where the data comes from, for the header.
#[derive(Clone, Debug)]
pub struct Source {
    pub url: String,
    /// True when top started this agent itself.
    pub own: bool,
}

/// Everything the screen shows.
#[derive(Debug)]
pub struct View {
    pub source: Source,
    pub rows: Vec<Row>,
    pub totals: Option<(Totals, Instant)>,
    pub rates: Option<Rates>,
    /// See [`held_by_process`].
    pub held_by: Vec<(String, u64)>,
    pub error: Option<String>,
    pub updated: Option<Instant>,
    pub sort: SortKey,
    pub reverse: bool,
    pub class: Option<&'static str>,
    pub filter: String,
    /// `Some(text)` while the filter is being typed.
    pub editing: Option<String>,
    pub table: TableState,
}

pub const CLASSES: [&str; 5] = ["zombie", "probing", "at_risk", "ok", "closing"];

impl View {
    pub fn new(source: Source) -> Self {
        Self {
            source,
            rows: Vec::new(),
            totals: None,
            rates: None,
            held_by: Vec::new(),
            error: None,
            updated: None,
            sort: SortKey::default(),
            reverse: false,
            class: None,
            filter: String::new(),
            editing: None,
            table: TableState::default(),
        }
    }

    /// Takes one refresh (or the error of one).
    pub fn update(&mut self, result: Result<super::fetch::Fetched, String>) {
        match result {
            Ok(fetched) => {
                let now = (fetched.totals, fetched.at);
                if let Some(before) = self.totals {
                    self.rates = Rates::between(before, now);
                }
                self.totals = Some(now);
                self.held_by = fetched.held_by;
                self.rows = fetched.rows;
                self.updated = Some(fetched.at);
                self.error = None;
            }
            Err(error) => self.error = Some(error),
        }
    }

    pub fn set_class(&mut self, class: Option<&str>) {
        self.class = class.and_then(|c| CLASSES.iter().copied().find(|k| *k == c));
        self.table.select(None);
    }

    /// The rows to show, filtered and sorted.
    pub fn visible(&self) -> Vec<&Row> {
        let needle = self
            .editing
            .as_deref()
            .unwrap_or(&self.filter)
            .to_ascii_lowercase();
        let mut rows: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| self.class.is_none_or(|c| r.class == c))
            .filter(|r| needle.is_empty() || r.matches(&needle))
            .collect();
        rows.sort_by(|a, b| {
            let order = self.sort.compare(a, b);
            if self.reverse { order.reverse() } else { order }
        });
        rows
    }

    fn count(&self, class: &str) -> usize {
        self.rows.iter().filter(|r| r.class == class).count()
    }

    fn header(&self, now: Instant) -> [Line<'_>; 2] {
        let own = if self.source.own { " (own agent)" } else { "" };
        let mut first = vec![
            Span::styled("ka top ", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(format!("{}{own} ", self.source.url)),
            Span::raw(format!("{} conns: ", self.rows.len())),
            Span::styled(
                format!("{} zombie ", self.count("zombie")),
                Style::new().fg(Color::Red),
            ),
            Span::styled(
                format!("{} probing ", self.count("probing")),
                Style::new().fg(Color::Magenta),
            ),
            Span::styled(
                format!("{} at risk", self.count("at_risk")),
                Style::new().fg(Color::Yellow),
            ),
        ];
        if self.rows.len() >= super::fetch::FETCH_LIMIT {
            first.push(Span::raw(" (worst first only)"));
        }
        let rate = |r: Option<f64>| r.map_or_else(|| "-".to_owned(), |r| format!("{r:.1}"));
        let mut second = vec![Span::raw(format!(
            "probes {}/s  resets {}/s  zombies total {}",
            rate(self.rates.map(|r| r.probes)),
            rate(self.rates.map(|r| r.resets)),
            self.totals
                .map_or_else(|| "-".to_owned(), |(t, _)| format!("{:.0}", t.zombies)),
        ))];
        if let Some(held) = self.held_text() {
            second.push(Span::styled(
                held,
                Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
            ));
        }
        match (&self.error, self.updated) {
            (Some(error), _) => second.push(Span::styled(
                format!("  NOT ANSWERING: {error}"),
                Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
            )),
            (None, None) => second.push(Span::raw("  connecting...")),
            (None, Some(at)) => second.push(Span::raw(format!(
                "  {:.0}s ago",
                now.saturating_duration_since(at).as_secs_f64()
            ))),
        }
        [Line::from(first), Line::from(second)]
    }

    /// `  dead held 3 (java 2, curl 1)`: connections the kernel ended whose
    /// processes still hold them (see `ka_dead_connections_held`); none
    /// when there are none.
    fn held_text(&self) -> Option<String> {
        let held: u64 = self.held_by.iter().map(|(_, n)| n).sum();
        if held == 0 {
            return None;
        }
        let names: Vec<String> = self
            .held_by
            .iter()
            .take(3)
            .map(|(comm, n)| {
                let comm = if comm.is_empty() { "?" } else { comm };
                format!("{comm} {n}")
            })
            .collect();
        let more = if self.held_by.len() > 3 { ", ..." } else { "" };
        Some(format!("  dead held {held} ({}{more})", names.join(", ")))
    }

    fn footer(&self) -> Line<'_> {
        if let Some(text) = &self.editing {
            return Line::from(vec![
                Span::styled("filter: ", Style::new().add_modifier(Modifier::BOLD)),
                Span::raw(text.as_str()),
                Span::styled("_", Style::new().add_modifier(Modifier::SLOW_BLINK)),
                Span::raw("  (Enter keeps, Esc clears)"),
            ]);
        }
        let mut parts = vec![format!(
            "sort:{}{}",
            self.sort.name(),
            if self.reverse { "\u{2191}" } else { "" }
        )];
        if let Some(class) = self.class {
            parts.push(format!("class:{class}"));
        }
        if !self.filter.is_empty() {
            parts.push(format!("filter:{}", self.filter));
        }
        Line::from(vec![
            Span::styled(
                format!("{} ", parts.join(" ")),
                Style::new().add_modifier(Modifier::REVERSED),
            ),
            Span::raw(" q quit / filter s sort r rev z p a o class 0 all"),
        ])
    }

    pub fn draw(&mut self, frame: &mut Frame<'_>) {
        let now = Instant::now();
        let [head, body, foot] = Layout::vertical([
            Constraint::Length(2),
            Constraint::Min(1),
            Constraint::Length(1),
        ])
        .areas(frame.area());
        frame.render_widget(Paragraph::new(self.header(now).to_vec()), head);
        frame.render_widget(Paragraph::new(self.footer()), foot);

        let columns = fit(body.width, self.rows.iter().any(|r| !r.pod.is_empty()));
        let rows: Vec<TableRow<'_>> = self
            .visible()
            .into_iter()
            .map(|row| {
                TableRow::new(columns.iter().map(|c| Cell::from(c.value(row))))
                    .style(class_style(&row.class))
            })
            .collect();
        let shown = rows.len();
        let table = Table::new(rows, columns.iter().map(|c| Constraint::Length(c.width())))
            .header(
                TableRow::new(columns.iter().map(|c| Cell::from(c.title())))
                    .style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED)),
            )
            .column_spacing(1)
            .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
        if shown == 0 {
            self.table.select(None);
        } else if self.table.selected().is_some_and(|s| s >= shown) {
            self.table.select(Some(shown - 1));
        }
        frame.render_stateful_widget(table, body, &mut self.table);
    }
}

fn class_style(class: &str) -> Style {
    match class {
        "zombie" => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        "probing" => Style::new().fg(Color::Magenta),
        "at_risk" => Style::new().fg(Color::Yellow),
        "closing" => Style::new().fg(Color::DarkGray),
        _ => Style::new(),
    }
}

/// A column of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Column {
    Class,
    Process,
    Pod,
    Local,
    Remote,
    State,
    Idle,
    Keepalive,
    Probes,
    Why,
}

impl Column {
    /// Display order.
    const ALL: [Self; 10] = [
        Self::Class,
        Self::Process,
        Self::Pod,
        Self::Local,
        Self::Remote,
        Self::State,
        Self::Idle,
        Self::Keepalive,
        Self::Probes,
        Self::Why,
    ];

    const fn width(self) -> u16 {
        match self {
            Self::Class => 7,
            Self::Process | Self::State => 10,
            Self::Pod => 16,
            Self::Local | Self::Remote => 21,
            Self::Idle | Self::Probes => 6,
            Self::Keepalive => 13,
            Self::Why => 34,
        }
    }

    const fn title(self) -> &'static str {
        match self {
            Self::Class => "CLASS",
            Self::Process => "PROCESS",
            Self::Pod => "POD",
            Self::Local => "LOCAL",
            Self::Remote => "REMOTE",
            Self::State => "STATE",
            Self::Idle => "IDLE",
            Self::Keepalive => "KEEPALIVE",
            Self::Probes => "PROBES",
            Self::Why => "WHY",
        }
    }

    fn value(self, row: &Row) -> String {
        match self {
            Self::Class => row.class.clone(),
            Self::Process => row.process.clone(),
            Self::Pod => row.pod.clone(),
            Self::Local => row.local.clone(),
            Self::Remote => row.remote.clone(),
            Self::State => short_state(&row.state).to_owned(),
            Self::Idle => idle(row.idle_secs),
            Self::Keepalive => row.keepalive.clone(),
            Self::Probes => format!("{}/{}", row.probes_sent, row.unanswered),
            Self::Why => row.why.clone(),
        }
    }
}

/// The columns that fit in `width`, most important first, shown in
/// display order. 80 columns hold class, process, remote, state, idle,
/// keepalive and probes.
fn fit(width: u16, pods: bool) -> Vec<Column> {
    use Column::{Class, Idle, Keepalive, Local, Pod, Probes, Process, Remote, State, Why};
    let priority: &[Column] = if pods {
        &[
            Class, Remote, Process, Idle, Keepalive, Probes, State, Pod, Local, Why,
        ]
    } else {
        &[
            Class, Remote, Process, Idle, Keepalive, Probes, State, Local, Why, Pod,
        ]
    };
    let mut used = 0u16;
    let mut chosen = Vec::new();
    for column in priority {
        let need = column.width() + u16::from(!chosen.is_empty());
        if used + need <= width {
            used += need;
            chosen.push(*column);
        }
    }
    Column::ALL
        .into_iter()
        .filter(|c| chosen.contains(c))
        .collect()
}

#[cfg(test)]
mod tests {
    use ratatui::{Terminal, backend::TestBackend};

    use super::*;

    fn json(class: &str, remote: &str, idle: f64, keepalive: bool) -> serde_json::Value {
        serde_json::json!({
            "cookie": 1, "netns": 4_026_531_840_u64, "local": "198.18.0.1:40000",
            "remote": remote, "direction": "outbound", "state": "ESTABLISHED",
            "history": [], "comm": "curl",
            "keepalive": {"enabled": keepalive, "idle_secs": 1.0, "interval_secs": 1.0,
                          "probes": 3, "unanswered": 2, "probes_sent": 5},
            "retransmits": 0, "last_error": 0, "idle_secs": idle, "class": class,
            "at_risk": if class == "at_risk" {
                serde_json::json!([{"reason": "keepalive_disabled", "idle_timeout": "3s"}])
            } else { serde_json::json!([]) },
        })
    }

    fn view() -> View {
        let mut view = View::new(Source {
            url: "http://127.0.0.1:9977".into(),
            own: false,
        });
        view.rows = [
            json("ok", "198.18.0.2:443", 50.0, true),
            json("at_risk", "198.18.0.2:80", 400.0, false),
            json("zombie", "198.18.0.3:5432", 1.0, false),
            json("at_risk", "198.18.0.4:80", 500.0, false),
        ]
        .iter()
        .filter_map(Row::from_json)
        .collect();
        view
    }

    fn remotes(view: &View) -> Vec<&str> {
        view.visible().iter().map(|r| r.remote.as_str()).collect()
    }

    #[test]
    fn rows_from_the_api() {
        let row = Row::from_json(&json("at_risk", "198.18.0.2:80", 1.0, true)).unwrap();
        assert_eq!(row.keepalive, "on 1s/1s\u{d7}3");
        assert_eq!(row.why, "keepalive_disabled>3s");
        assert_eq!((row.probes_sent, row.unanswered), (5, 2));
        assert_eq!(row.pod, "");
        let mut in_pod = json("ok", "x", 1.0, false);
        in_pod["pod"] =
            serde_json::json!({"namespace": "shop", "pod": "web-1", "container": "nginx"});
        assert_eq!(Row::from_json(&in_pod).unwrap().pod, "shop/web-1");
        let mut c = json("ok", "x", 1.0, false);
        c["keepalive"]["idle_secs"] = 7200.into();
        assert_eq!(Row::from_json(&c).unwrap().keepalive, "off");
        c["keepalive"]["enabled"] = true.into();
        c["keepalive"]["interval_secs"] = 75.into();
        c["keepalive"]["probes"] = 9.into();
        assert_eq!(Row::from_json(&c).unwrap().keepalive, "on 2h/75s\u{d7}9");
        assert!(Row::from_json(&serde_json::json!({"local": "x"})).is_none());
        let mut dying = json("ok", "x", 1.0, false);
        dying["soft_error"] = "No route to host".into();
        assert_eq!(Row::from_json(&dying).unwrap().why, "No route to host");
        let mut at_risk_and_dying = json("at_risk", "x", 1.0, false);
        at_risk_and_dying["soft_error"] = "No route to host".into();
        assert_eq!(
            Row::from_json(&at_risk_and_dying).unwrap().why,
            "keepalive_disabled>3s (No route to host)"
        );
    }

    #[test]
    fn idle_is_short() {
        assert_eq!(idle(0.42), "0.4s");
        assert_eq!(idle(12.0), "12s");
        assert_eq!(idle(303.0), "5m03s");
        assert_eq!(idle(7800.0), "2h10m");
        assert_eq!(idle(3.0 * 86_400.0 + 4.0 * 3600.0), "3d04h");
    }

    #[test]
    fn worst_first_then_sort_keys_and_filters() {
        let mut view = view();
        assert_eq!(
            remotes(&view),
            [
                "198.18.0.3:5432",
                "198.18.0.4:80",
                "198.18.0.2:80",
                "198.18.0.2:443"
            ]
        );
        view.sort = SortKey::Idle;
        assert_eq!(remotes(&view)[0], "198.18.0.4:80");
        view.reverse = true;
        assert_eq!(remotes(&view)[0], "198.18.0.3:5432");
        view.reverse = false;
        view.sort = SortKey::Remote;
        assert_eq!(remotes(&view)[0], "198.18.0.2:443");
        let mut key = SortKey::Worst;
        for _ in 0..7 {
            key = key.next();
        }
        assert_eq!(key, SortKey::Worst, "s cycles through every column");

        view.sort = SortKey::Worst;
        view.set_class(Some("at_risk"));
        assert_eq!(remotes(&view), ["198.18.0.4:80", "198.18.0.2:80"]);
        view.set_class(None);
        view.filter = ":443".into();
        assert_eq!(remotes(&view), ["198.18.0.2:443"]);
        view.filter = "ZOMBIE".into();
        assert_eq!(remotes(&view), ["198.18.0.3:5432"]);
        // What is being typed filters already.
        view.editing = Some("198.18.0.4".into());
        assert_eq!(remotes(&view), ["198.18.0.4:80"]);
    }

    #[test]
    fn rates_from_metric_deltas() {
        let before = Totals::from_metrics(
            "# HELP x\nka_keepalive_probes_total{netns=\"1\"} 10\nka_keepalive_probes_total{netns=\"2\"} 5\n\
             ka_resets_received_total{a=\"b c\"} 1\nka_resets_sent_total{reason=\"x\"} 2\nka_zombies_total{kind=\"k\"} 3\n",
        );
        assert_eq!(
            before,
            Totals {
                probes: 15.0,
                resets: 3.0,
                zombies: 3.0
            }
        );
        let t0 = Instant::now();
        let t1 = t0 + std::time::Duration::from_secs(2);
        let after = Totals {
            probes: 21.0,
            resets: 4.0,
            zombies: 3.0,
        };
        let rates = Rates::between((before, t0), (after, t1)).unwrap();
        assert!((rates.probes - 3.0).abs() < 1e-9 && (rates.resets - 0.5).abs() < 1e-9);
        // An agent restart does not give negative rates.
        let restarted = Rates::between((after, t0), (Totals::default(), t1)).unwrap();
        assert!(restarted.probes.abs() < f64::EPSILON);
    }

    #[test]
    fn the_processes_holding_dead_connections_are_named_in_the_header() {
        let metrics = "# HELP ka_dead_connections_held x\n\
             ka_dead_connections_held{cause=\"keepalive_timeout\",comm=\"java\",port=\"5432\"} 2\n\
             ka_dead_connections_held{cause=\"reset_received\",comm=\"java\",port=\"6379\"} 1\n\
             ka_dead_connections_held{cause=\"reset_received\",comm=\"my \\\"app\\\"\",port=\"80\"} 1\n\
             ka_dead_connections_held{cause=\"reset_received\",comm=\"gone\",port=\"81\"} 0\n\
             ka_dead_connections_held{cause=\"reset_received\",port=\"82\"} 1\n\
             ka_dead_connections_held_other{comm=\"x\"} 5\n";
        let held = held_by_process(metrics);
        assert_eq!(
            held,
            [
                ("java".to_owned(), 3),
                (String::new(), 1),
                ("my \"app\"".to_owned(), 1)
            ]
        );
        let mut view = view();
        assert!(!screen(&mut view, 100).contains("dead held"));
        view.held_by = held;
        let text = screen(&mut view, 100);
        assert!(
            text.contains("dead held 5 (java 3, ? 1, my \"app\" 1)"),
            "{text}"
        );
    }

    fn screen(view: &mut View, width: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, 10)).unwrap();
        terminal.draw(|frame| view.draw(frame)).unwrap();
        let buffer = terminal.backend().buffer();
        (0..buffer.area.height)
            .map(|y| {
                (0..buffer.area.width)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn fits_80_columns() {
        let mut view = view();
        let text = screen(&mut view, 80);
        for needle in [
            "CLASS",
            "PROCESS",
            "REMOTE",
            "STATE",
            "IDLE",
            "KEEPALIVE",
            "PROBES",
        ] {
            assert!(text.contains(needle), "{needle} missing:\n{text}");
        }
        assert!(
            text.contains("zombie") && text.contains("198.18.0.3:5432"),
            "{text}"
        );
        assert!(
            text.contains("on 1s/1s\u{d7}3") && text.contains("5/2"),
            "{text}"
        );
        assert!(
            text.contains("1 zombie") && text.contains("2 at risk"),
            "{text}"
        );
        assert!(text.contains("q quit"), "{text}");
        let wide = screen(&mut view, 160);
        assert!(wide.contains("LOCAL") && wide.contains("WHY"), "{wide}");
        assert!(wide.contains("keepalive_disabled>3s"), "{wide}");
        for width in [80, 100, 120, 160, 200] {
            let used: u16 = fit(width, false).iter().map(|c| c.width() + 1).sum();
            assert!(used <= width + 1, "{width}");
        }
    }
}
