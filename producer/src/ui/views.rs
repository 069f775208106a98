//! The console's page layout and the pieces its pages are made of, as maud templates
//! (compiled with the code; every interpolated value is HTML-escaped), and the number,
//! time and duration formats they share.
//!
//! Pages must render under the console's Content-Security-Policy (no inline script or
//! style): progress is a native `<progress>`, the chart an SVG whose look comes from the
//! stylesheet.

use bulkops_shared::batch::BatchState;
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use super::session::Viewer;

/// Which navigation entry a page belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    /// The overview.
    Overview,
    /// The batch list and batch pages.
    Batches,
    /// Sign-in and error pages.
    None,
}

/// Asset URLs carry the version, so a new release is never served an old script.
fn asset(name: &str) -> String {
    format!("/ui/static/{name}?v={}", env!("CARGO_PKG_VERSION"))
}

/// A whole page: `head_extra` goes into `<head>` (a `<noscript>` refresh), `body` into
/// `<main>`.
pub fn page(
    title: &str,
    viewer: Option<&Viewer>,
    nav: Nav,
    head_extra: Markup,
    body: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · bulkops console" }
                link rel="stylesheet" href=(asset("console.css"));
                script src=(asset("console.js")) defer {}
                (head_extra)
            }
            body {
                header.top {
                    a.brand href="/ui" { "bulkops" }
                    nav {
                        a href="/ui" aria-current=[(nav == Nav::Overview).then_some("page")] { "Overview" }
                        a href="/ui/batches" aria-current=[(nav == Nav::Batches).then_some("page")] { "Batches" }
                    }
                    @if let Some(v) = viewer {
                        div.who {
                            span #signed-in { "Signed in as " (v.label()) }
                            form method="post" action="/ui/logout" {
                                input type="hidden" name="csrf" value=(v.csrf);
                                button.link type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// An error page.
pub fn error_page(status: u16, title: &str, detail: &str) -> Markup {
    page(
        title,
        None,
        Nav::None,
        html! {},
        html! {
            h1 { (status) " " (title) }
            p #error { (detail) }
            p { a href="/ui" { "Back to the console" } }
        },
    )
}

/// The sign-in page.
pub fn login_page(next: &str, csrf: &str, error: Option<&str>) -> Markup {
    page(
        "Sign in",
        None,
        Nav::None,
        html! {},
        html! {
            h1 { "Sign in" }
            @if let Some(e) = error { p.error #login-error role="alert" { (e) } }
            p {
                "Paste an operator token (" code { "bulkops token --operator NAME" }
                ") to see every agency, or your CRM token to see your agency's batches."
            }
            form.login method="post" action="/ui/login" {
                input type="hidden" name="csrf" value=(csrf);
                input type="hidden" name="next" value=(next);
                label for="token" { "Token" }
                textarea #token name="token" rows="5" required autocomplete="off" spellcheck="false" {}
                button #sign-in type="submit" { "Sign in" }
            }
            p.hint { "The token is kept in a cookie only this console reads, until it expires or you sign out." }
        },
    )
}

/// A batch state as a badge.
pub fn state_badge(state: BatchState) -> Markup {
    html! { span class=(format!("state state-{}", state.as_str())) data-state=(state.as_str()) { (state.as_str()) } }
}

/// A progress bar with "done / total (pct)" beside it; `id` names the live one of a page.
pub fn progress_bar(done: i64, total: i64, id: Option<&str>) -> Markup {
    let text = format!(
        "{} / {} ({})",
        fmt_int(done),
        fmt_int(total),
        super::live::pct(done, total)
    );
    html! {
        span.progress {
            progress id=[id] value=(done.max(0)) max=(total.max(1)) { (text) }
            " "
            span.progress-text id=[id.map(|i| format!("{i}-text"))] { (text) }
        }
    }
}

/// An integer with thousands separators.
pub fn fmt_int(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Items per second, or a dash when unknown.
pub fn fmt_rate(rate: Option<f64>) -> String {
    match rate {
        None => "—".to_owned(),
        Some(r) if r >= 10.0 => format!("{}/s", fmt_int(r.round() as i64)),
        Some(r) => format!("{r:.1}/s"),
    }
}

/// A duration in seconds as `1h 02m`, `3m 05s` or `12s`.
pub fn fmt_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as i64;
    match s {
        s if s >= 3600 => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m {:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// A timestamp in UTC.
pub fn fmt_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// How long ago, with the exact time as a tooltip.
pub fn ago(t: DateTime<Utc>, now: DateTime<Utc>) -> Markup {
    let secs = (now - t).num_milliseconds() as f64 / 1000.0;
    html! { time datetime=(t.to_rfc3339()) title=(fmt_time(t)) { (fmt_duration(secs)) " ago" } }
}

/// One bar of the throughput chart.
#[derive(Debug, Clone, Copy)]
pub struct Bar {
    /// End of the interval.
    pub at: DateTime<Utc>,
    /// Its length in seconds.
    pub seconds: f64,
    /// Items decided in it.
    pub items: i64,
}

/// Width and height of the chart, in SVG units.
const CHART_W: f64 = 720.0;
const CHART_H: f64 = 160.0;
const AXIS: f64 = 18.0;

/// The throughput chart: items per second over the last `window_secs` before `now`, one
/// bar per sample, drawn where its interval lies (a gap is a time nobody sampled).
pub fn throughput_chart(bars: &[Bar], now: DateTime<Utc>, window_secs: f64) -> Markup {
    let rates: Vec<f64> = bars
        .iter()
        .map(|b| b.items as f64 / b.seconds.max(0.001))
        .collect();
    let peak = rates.iter().copied().fold(0.0_f64, f64::max);
    let scale = nice_ceiling(peak);
    let plot_h = CHART_H - AXIS;
    let x_of = |t: DateTime<Utc>| {
        let back = (now - t).num_milliseconds() as f64 / 1000.0;
        CHART_W * (1.0 - back / window_secs)
    };
    let total: i64 = bars.iter().map(|b| b.items).sum();
    html! {
        figure.chart {
            svg #throughput viewBox=(format!("0 0 {CHART_W} {CHART_H}")) role="img"
                aria-label=(format!("Items decided per second over the last {} minutes: {} in all, peak {}", (window_secs / 60.0).round(), fmt_int(total), fmt_rate(Some(peak)))) {
                line.axis x1="0" y1=(plot_h) x2=(CHART_W) y2=(plot_h) {}
                @for (b, r) in bars.iter().zip(&rates) {
                    @let x1 = x_of(b.at - chrono::Duration::milliseconds((b.seconds * 1000.0) as i64)).max(0.0);
                    @let x2 = x_of(b.at).min(CHART_W);
                    @let h = if scale > 0.0 { plot_h * r / scale } else { 0.0 };
                    @if x2 > x1 {
                        rect.bar x=(format!("{x1:.1}")) y=(format!("{:.1}", plot_h - h)) width=(format!("{:.1}", (x2 - x1 - 1.0).max(1.0))) height=(format!("{h:.1}")) {
                            title { (fmt_time(b.at)) ": " (fmt_int(b.items)) " items, " (fmt_rate(Some(*r))) }
                        }
                    }
                }
                text.label x="2" y="12" { (fmt_rate(Some(scale))) }
                text.label x="2" y=(CHART_H - 4.0) { "−" ((window_secs / 60.0).round()) " min" }
                text.label.end x=(CHART_W - 2.0) y=(CHART_H - 4.0) { "now" }
            }
            figcaption {
                "Items the workers decided per second, last " ((window_secs / 60.0).round()) " minutes: "
                (fmt_int(total)) " in all, peak " (fmt_rate(Some(peak))) "."
            }
        }
    }
}

/// The smallest of 1, 2, 5 × 10^n at or above `v` (0 for 0).
pub fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 {
        return 0.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if v <= m * mag + 1e-9 {
            return m * mag;
        }
    }
    10.0 * mag
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_durations_read_well() {
        assert_eq!(fmt_int(0), "0");
        assert_eq!(fmt_int(1234567), "1,234,567");
        assert_eq!(fmt_int(-1000), "-1,000");
        assert_eq!(fmt_rate(None), "—");
        assert_eq!(fmt_rate(Some(2.345)), "2.3/s");
        assert_eq!(fmt_rate(Some(12345.4)), "12,345/s");
        assert_eq!(fmt_duration(5.4), "5s");
        assert_eq!(fmt_duration(185.0), "3m 05s");
        assert_eq!(fmt_duration(3720.0), "1h 02m");
        assert_eq!(nice_ceiling(0.0), 0.0);
        assert_eq!(nice_ceiling(3.0), 5.0);
        assert_eq!(nice_ceiling(1000.0), 1000.0);
        assert_eq!(nice_ceiling(1001.0), 2000.0);
    }

    #[test]
    fn templates_escape_what_they_show() {
        let page = error_page(404, "Not found", "<script>alert(1)</script>").into_string();
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(page.contains("&lt;script&gt;"), "{page}");
    }

    #[test]
    fn the_chart_places_bars_in_their_interval() {
        let now = Utc::now();
        let bars = [
            Bar {
                at: now - chrono::Duration::seconds(450),
                seconds: 10.0,
                items: 100,
            },
            Bar {
                at: now,
                seconds: 10.0,
                items: 50,
            },
        ];
        let svg = throughput_chart(&bars, now, 900.0).into_string();
        assert_eq!(svg.matches("<rect").count(), 2, "{svg}");
        assert!(svg.contains("150 in all"), "{svg}");
        assert!(svg.contains("peak 10/s"), "{svg}");
    }
}
