//! `meterd fleet export`: every host's settled viewing sessions, read back
//! from the stream, each once.
//!
//! The stream may hold a record more than once (a re-publish after the
//! duplicate window, a replay of a ledger): the export keeps the first
//! message of each record id, so what it writes does not depend on how
//! often a record was shipped.

use std::{collections::HashSet, io::Write, time::SystemTime};

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt as _;
use serde::Serialize;

use super::{FleetConfig, FleetError, record::Envelope, record::Kind};
use crate::ledger::{self, ExportFormat, SessionRecord};

/// One session as the fleet export writes it: the ledger export's fields,
/// then the host.
#[derive(Debug, Clone, Serialize)]
pub struct FleetSession {
    #[serde(flatten)]
    pub session: SessionRecord,
    pub host: String,
}

/// Reads every settled session from the stream (ended at or after
/// `since`), each record id once, ordered as the ledger export orders
/// (end time, then session id), then by host.
pub async fn sessions(
    config: &FleetConfig,
    since: Option<SystemTime>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<FleetSession>, FleetError> {
    let client = super::connect(config, "meterd-fleet-export").await?;
    let js = jetstream::new(client);
    let stream_err = |e: &dyn std::fmt::Display| FleetError::Stream {
        name: config.stream.clone(),
        message: e.to_string(),
    };
    let mut stream = js
        .get_stream(&config.stream)
        .await
        .map_err(|e| stream_err(&e))?;
    let total = stream
        .info()
        .await
        .map_err(|e| stream_err(&e))?
        .state
        .messages;
    let mut out = Vec::new();
    if total == 0 {
        return Ok(out);
    }
    let deliver_policy = since.map_or(consumer::DeliverPolicy::All, |t| {
        consumer::DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::from(t),
        }
    });
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: format!("{}.*.{}", config.subject_prefix, Kind::Session.as_str()),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| stream_err(&e))?;
    let mut messages = consumer.messages().await.map_err(|e| stream_err(&e))?;
    let mut seen = HashSet::new();
    let mut read = 0;
    loop {
        // Nothing within the timeout: the filter matched no (more) message.
        let Ok(next) =
            tokio::time::timeout(std::time::Duration::from_secs(3), messages.next()).await
        else {
            break;
        };
        let Some(message) = next else { break };
        let message = message.map_err(|e| stream_err(&e))?;
        read += 1;
        let pending = message.info().map_or(0, |i| i.pending);
        progress(read, read + pending);
        match serde_json::from_slice::<Envelope>(&message.payload) {
            Ok(e) if e.kind == Kind::Session => {
                if seen.insert(e.id.clone())
                    && let Ok(session) = serde_json::from_value::<SessionRecord>(e.record)
                {
                    let ended = humantime::parse_rfc3339(&session.ended_at).ok();
                    if since.is_none_or(|s| ended.is_some_and(|e| e >= s)) {
                        out.push(FleetSession {
                            session,
                            host: e.host,
                        });
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "fleet export: a message that is not a meterd record: skipped");
            }
        }
        if pending == 0 {
            break;
        }
    }
    out.sort_by(|a, b| {
        (&a.session.ended_at, &a.session.session_id, &a.host).cmp(&(
            &b.session.ended_at,
            &b.session.session_id,
            &b.host,
        ))
    });
    Ok(out)
}

/// Writes the sessions as the ledger export does, with a `host` column.
pub fn write(
    sessions: &[FleetSession],
    format: ExportFormat,
    out: &mut dyn Write,
) -> std::io::Result<usize> {
    let mut columns = ledger::SESSION_COLUMNS.to_vec();
    columns.push("host");
    ledger::write_records(sessions, &columns, format, out)
}
