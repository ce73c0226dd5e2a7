//! VirtualMachineInstancePresets: when a VMI is first reconciled (before its pod exists), every
//! preset of its namespace whose selector matches its labels is merged into its domain once, and
//! the names are recorded in the [`APPLIED`] annotation. A preset that sets something the VMI
//! (or an earlier preset) sets differently is a conflict: it is skipped whole and a warning event
//! names the field.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::events::EventType;
use serde_json::json;

use super::{Context, Error, MANAGER};
use crate::crd::spec::{Cpu, DomainSpec, Memory, ResourceRequirements};
use crate::crd::{VirtualMachineInstance, VirtualMachineInstancePreset};

/// Annotation on a VMI: the presets applied to it, comma-separated (empty: none matched).
pub const APPLIED: &str = "ferrovirt.io/presets-applied";

/// Sets `*into` from `from` unless it holds a different value already.
fn merge_field<T: Clone + PartialEq>(
    into: &mut Option<T>,
    from: &Option<T>,
    field: &str,
) -> Result<(), String> {
    match (into.as_ref(), from) {
        (_, None) => Ok(()),
        (None, Some(v)) => {
            *into = Some(v.clone());
            Ok(())
        }
        (Some(a), Some(b)) if a == b => Ok(()),
        (Some(_), Some(_)) => Err(field.to_owned()),
    }
}

fn merge_map(
    into: &mut Option<BTreeMap<String, Quantity>>,
    from: &Option<BTreeMap<String, Quantity>>,
    field: &str,
) -> Result<(), String> {
    let Some(from) = from else { return Ok(()) };
    let into = into.get_or_insert_with(BTreeMap::new);
    for (k, v) in from {
        match into.get(k) {
            Some(old) if old != v => return Err(format!("{field}.{k}")),
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(())
}

/// `domain` with `preset` merged in, or the conflicting field's path.
pub fn merge(domain: &DomainSpec, preset: &DomainSpec) -> Result<DomainSpec, String> {
    let mut out = domain.clone();
    if let Some(p) = &preset.cpu {
        let cpu = out.cpu.get_or_insert_with(Cpu::default);
        merge_field(&mut cpu.cores, &p.cores, "domain.cpu.cores")?;
        merge_field(&mut cpu.sockets, &p.sockets, "domain.cpu.sockets")?;
        merge_field(&mut cpu.threads, &p.threads, "domain.cpu.threads")?;
        merge_field(
            &mut cpu.max_sockets,
            &p.max_sockets,
            "domain.cpu.maxSockets",
        )?;
    }
    if let Some(p) = &preset.memory {
        let memory = out.memory.get_or_insert_with(Memory::default);
        merge_field(&mut memory.guest, &p.guest, "domain.memory.guest")?;
        merge_field(
            &mut memory.max_guest,
            &p.max_guest,
            "domain.memory.maxGuest",
        )?;
    }
    if let Some(p) = &preset.resources {
        let res = out
            .resources
            .get_or_insert_with(ResourceRequirements::default);
        merge_map(&mut res.requests, &p.requests, "domain.resources.requests")?;
        merge_map(&mut res.limits, &p.limits, "domain.resources.limits")?;
    }
    merge_field(
        &mut out.devices.rng,
        &preset.devices.rng,
        "domain.devices.rng",
    )?;
    merge_field(
        &mut out.devices.autoattach_serial_console,
        &preset.devices.autoattach_serial_console,
        "domain.devices.autoattachSerialConsole",
    )?;
    merge_field(&mut out.firmware, &preset.firmware, "domain.firmware")?;
    Ok(out)
}

/// Applies matching presets once. True when the VMI was changed (reconcile again).
pub async fn apply(
    vmi: &VirtualMachineInstance,
    ctx: &Context,
    vmis: &Api<VirtualMachineInstance>,
) -> Result<bool, Error> {
    if vmi.annotations().contains_key(APPLIED) {
        return Ok(false);
    }
    let ns = vmi.namespace().unwrap_or_default();
    let presets: Api<VirtualMachineInstancePreset> = Api::namespaced(ctx.client.clone(), &ns);
    let mut list = presets.list(&ListParams::default()).await?.items;
    list.sort_by_key(|p| p.name_any());
    let mut domain = vmi.spec.domain.clone();
    let mut applied = Vec::new();
    for preset in &list {
        let selector = match Selector::try_from(preset.spec.selector.clone()) {
            Ok(s) => s,
            Err(e) => {
                ctx.event(
                    vmi,
                    EventType::Warning,
                    "PresetFailed",
                    "ApplyPreset",
                    format!("preset {} has an invalid selector: {e}", preset.name_any()),
                )
                .await;
                continue;
            }
        };
        if !selector.matches(vmi.labels()) {
            continue;
        }
        let Some(settings) = &preset.spec.domain else {
            applied.push(preset.name_any());
            continue;
        };
        match merge(&domain, settings) {
            Ok(merged) => {
                domain = merged;
                applied.push(preset.name_any());
            }
            Err(field) => {
                ctx.event(
                    vmi,
                    EventType::Warning,
                    "PresetConflict",
                    "ApplyPreset",
                    format!(
                        "preset {} not applied: it sets {field}, which the VMI sets differently",
                        preset.name_any()
                    ),
                )
                .await;
            }
        }
    }
    let names = applied.join(",");
    let patch = json!({
        "metadata": {"annotations": {APPLIED: names}},
        "spec": {"domain": domain},
    });
    vmis.patch(
        &vmi.name_any(),
        &PatchParams {
            field_manager: Some(MANAGER.into()),
            ..Default::default()
        },
        &Patch::Merge(&patch),
    )
    .await?;
    if !applied.is_empty() {
        ctx.event(
            vmi,
            EventType::Normal,
            "PresetsApplied",
            "ApplyPreset",
            format!("applied presets: {names}"),
        )
        .await;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(yaml: &str) -> DomainSpec {
        serde_yaml::from_str(yaml).expect("domain")
    }

    #[test]
    fn presets_fill_what_is_unset_and_refuse_to_override() {
        let vmi = domain("{cpu: {cores: 2}, devices: {}}");
        let preset = domain(
            "{cpu: {sockets: 1}, memory: {guest: 1Gi}, resources: {requests: {cpu: 500m}}, devices: {rng: {}}}",
        );
        let merged = merge(&vmi, &preset).expect("merge");
        assert_eq!(merged.cpu.as_ref().and_then(|c| c.cores), Some(2));
        assert_eq!(merged.cpu.as_ref().and_then(|c| c.sockets), Some(1));
        assert_eq!(
            merged.memory.as_ref().and_then(|m| m.guest.clone()),
            Some(Quantity("1Gi".into()))
        );
        assert!(merged.devices.rng.is_some());
        let clash = domain("{cpu: {cores: 4}, devices: {}}");
        assert_eq!(merge(&vmi, &clash), Err("domain.cpu.cores".to_owned()));
        let same = domain("{cpu: {cores: 2}, devices: {}}");
        assert!(merge(&vmi, &same).is_ok());
        let with_req = domain("{resources: {requests: {cpu: '1'}}, devices: {}}");
        assert_eq!(
            merge(&merged, &with_req),
            Err("domain.resources.requests.cpu".to_owned())
        );
    }
}
