//! Figures collected over several runs, shown as "median (min–max)" in one Markdown table.

/// How the third column of a row is derived from the first two, run by run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Derived {
    /// Gateway minus direct: what the gateway adds.
    Added,
    /// Gateway over direct.
    Ratio,
    /// Only the gateway is measured.
    None,
}

/// A target, checked on the median of one column.
#[derive(Clone, Copy)]
pub struct Target {
    pub text: &'static str,
    /// Checked on the derived column (else on the gateway's).
    pub on_derived: bool,
    pub met: fn(f64) -> bool,
}

struct Row {
    group: String,
    name: String,
    unit: &'static str,
    derived: Derived,
    target: Option<Target>,
    gateway: Vec<f64>,
    direct: Vec<f64>,
    third: Vec<f64>,
}

#[derive(Default)]
pub struct Report {
    rows: Vec<Row>,
    group: String,
}

impl Report {
    /// Rows recorded from now on belong to this group (a heading line in the table).
    pub fn group(&mut self, group: &str) {
        self.group = group.to_owned();
    }

    /// One run's figure for a row (created on first use; a row is known by group and name).
    pub fn record(
        &mut self,
        name: &str,
        unit: &'static str,
        gateway: f64,
        direct: Option<f64>,
        derived: Derived,
        target: Option<Target>,
    ) {
        let index = match self
            .rows
            .iter()
            .position(|row| row.group == self.group && row.name == name)
        {
            Some(index) => index,
            None => {
                self.rows.push(Row {
                    group: self.group.clone(),
                    name: name.to_owned(),
                    unit,
                    derived,
                    target,
                    gateway: Vec::new(),
                    direct: Vec::new(),
                    third: Vec::new(),
                });
                self.rows.len() - 1
            }
        };
        let row = &mut self.rows[index];
        row.gateway.push(gateway);
        if let Some(direct) = direct {
            row.direct.push(direct);
            match derived {
                Derived::Added => row.third.push(gateway - direct),
                Derived::Ratio => row.third.push(gateway / direct),
                Derived::None => {}
            }
        }
    }

    /// The table, in Markdown.
    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| measurement | unit | gateway | direct | added (or ratio) | target | met |\n\
             |---|---|---|---|---|---|---|\n",
        );
        let mut group = "";
        for row in &self.rows {
            if row.group != group {
                group = &row.group;
                out.push_str(&format!("| **{group}** | | | | | | |\n"));
            }
            let third = match row.derived {
                Derived::Added => spread(&row.third, ""),
                Derived::Ratio => spread(&row.third, "×"),
                Derived::None => String::new(),
            };
            let (target, met) = match row.target {
                Some(target) => {
                    let column = if target.on_derived {
                        &row.third
                    } else {
                        &row.gateway
                    };
                    let verdict = match median(column) {
                        Some(value) if (target.met)(value) => "yes",
                        Some(_) => "**no**",
                        None => "",
                    };
                    (target.text, verdict)
                }
                None => ("", ""),
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                row.name,
                row.unit,
                spread(&row.gateway, ""),
                spread(&row.direct, ""),
                third,
                target,
                met
            ));
        }
        out
    }
}

fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[n / 2]),
        n => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// "median (min–max)", or the value alone for a single run.
fn spread(values: &[f64], suffix: &str) -> String {
    let Some(middle) = median(values) else {
        return String::new();
    };
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if values.len() == 1 {
        format!("{}{suffix}", number(middle))
    } else {
        format!(
            "{}{suffix} ({}–{})",
            number(middle),
            number(min),
            number(max)
        )
    }
}

/// Three significant figures, without scientific notation.
fn number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else if magnitude >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}
