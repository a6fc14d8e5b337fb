//! The schema check's cost on the ingest path: HTTP batches of 1 000 with `Prefer:
//! respond-async` (answered once JetStream has them, so the gateway is what is measured) of a
//! type without a schema and of a type with one, alternated over two rounds.

use anyhow::bail;
use serde_json::{Value, json};

use crate::Bench;
use std::time::Instant;

use event_service::registry::schemas::{Active, Checked, SchemaMode, SchemaVersion};

use crate::baseline::{run_tag, sample, stored_event};
use crate::cpu::CpuTimes;
use crate::report::Limit;

/// A schema every bench sample matches, with the checks a real one has.
fn order_schema() -> Value {
    json!({
        "schema": {
            "type": "object",
            "required": ["order_id", "amount", "currency"],
            "additionalProperties": false,
            "properties": {
                "order_id": {"type": "string", "maxLength": 64},
                "amount": {"type": "number", "minimum": 0},
                "currency": {"enum": ["EUR", "USD", "GBP"]},
                "items": {"type": "integer", "minimum": 1},
                "plan": {"enum": ["basic", "premium"]}
            }
        }
    })
}

impl Bench {
    /// The check by itself, in this process: decode-free, one core, the sample events.
    fn check_alone(&self) -> anyhow::Result<()> {
        let stored = SchemaVersion {
            event_type: "bench.schema".into(),
            version: 1,
            schema: sqlx::types::Json(order_schema()["schema"].clone()),
            mode: SchemaMode::Reject,
            redact: sqlx::types::Json(Vec::new()),
            compatibility: "backward".into(),
            created_at: chrono::Utc::now(),
        };
        let active = Active::compile(&stored).map_err(anyhow::Error::msg)?;
        let run = run_tag();
        let mut events: Vec<_> = (0..self.size(100_000, 1_000_000))
            .map(|i| stored_event(&sample(&run, "bench.schema", i)))
            .collect::<anyhow::Result<_>>()?;
        let started = Instant::now();
        for event in &mut events {
            if active.check(event) != Checked::Valid {
                bail!("a bench sample does not match the bench schema");
            }
        }
        let per_event = started.elapsed().as_secs_f64() * 1e6 / events.len() as f64;
        println!("  the check alone: {per_event:.2} µs per event");
        self.report.push(
            "Schema check alone (in process, one core)",
            format!("{per_event:.2} µs per event"),
            "",
            String::new(),
        );
        Ok(())
    }

    pub async fn schema_cost(&self) -> anyhow::Result<()> {
        self.check_alone()?;
        let total = self.size(20_000, 100_000);
        for round in 1..=2 {
            for checked in [false, true] {
                let run = run_tag();
                let label = if checked { "with a schema" } else { "no schema" };
                let event_type = format!("bench.schema.{run}");
                if checked {
                    let path = format!("/api/v1/events/schemas/{event_type}");
                    let response = self.put(&path).json(&order_schema()).send().await?;
                    if !response.status().is_success() {
                        bail!("the bench schema was refused: {}", response.text().await?);
                    }
                }
                let bodies: Vec<Vec<Value>> = (0..total / 1_000)
                    .map(|b| (0..1_000).map(|i| sample(&run, &event_type, b * 1_000 + i)).collect())
                    .collect();
                let cpu = CpuTimes::now();
                let elapsed = self.send_batches(&bodies, true, &format!("batches of 1 000, {label}")).await?;
                let scenario =
                    format!("Schema check: batches of 1 000 (`Prefer: respond-async`), {label}, round {round}");
                self.report.rate(&scenario, total as f64 / elapsed.as_secs_f64(), "ev", "", Limit::None);
                self.cpu_cost(&scenario, &cpu, total).await?;
                self.drain().await?;
            }
        }
        Ok(())
    }
}
