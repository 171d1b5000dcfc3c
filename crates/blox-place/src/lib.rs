//! Loading a game into an instance tree: a Rojo project, a place file, or a single script.
//!
//! Real games are Rojo projects: a `*.project.json` that maps folders of Luau files onto the
//! DataModel. [`load`] turns one into an `rbx_dom_weak::WeakDom` whose root is the DataModel,
//! following Rojo's file conventions (`*.server.luau` is a Script, `*.client.luau` a
//! LocalScript, any other `*.luau`/`*.lua` a ModuleScript, `init.*` turns its folder into that
//! script, `*.txt` a StringValue), so the engine mounts what Rojo would have built in Studio.
//! Place files saved by Studio load with the rojo-rbx decoders (`.rbxl` binary, `.rbxlx`
//! XML). A single `.luau` file loads as one Script in ServerScriptService, so `blox run
//! file.luau` keeps working. Scripts keep their code in the `Source` property, as in a place
//! file.

use std::path::{Path, PathBuf};

use rbx_dom_weak::types::{Attributes, Variant};
use rbx_dom_weak::{InstanceBuilder, WeakDom};
use serde_json::{Map, Value as Json};

/// Why a game could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// A file or folder could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A project file is not valid JSON or not a valid Rojo project.
    #[error("invalid project {path}: {reason}")]
    Project {
        /// The project file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A place file could not be decoded.
    #[error("invalid place file {path}: {reason}")]
    PlaceFile {
        /// The place file.
        path: PathBuf,
        /// The decoder's complaint.
        reason: String,
    },
    /// The path is none of the kinds Blox loads.
    #[error(
        "{0} is not a Luau script (.luau, .lua), a Rojo project (*.project.json), a folder holding default.project.json or a place file (.rbxl, .rbxlx)"
    )]
    UnknownKind(PathBuf),
}

/// What was loaded.
#[derive(Debug)]
pub struct Place {
    /// The DataModel and everything under it.
    pub dom: WeakDom,
    /// The project's name (a script's file name for a single script).
    pub name: String,
    /// True when the place is a single script file, whose errors name the file.
    pub single_script: bool,
    /// The project's `.luaurc` aliases for string requires (`require("@Shared/Util")`), each
    /// as the names leading from `game` to the instance its folder became.
    pub aliases: Vec<(String, Vec<String>)>,
}

/// Loads the game at `path`: a `.luau`/`.lua` file, a `*.project.json`, or a folder with a
/// `default.project.json`.
pub fn load(path: &Path) -> Result<Place, PlaceError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if path.is_dir() {
        return load_project(&path.join("default.project.json"));
    }
    if name.ends_with(".project.json") {
        return load_project(path);
    }
    if name.ends_with(".rbxl") || name.ends_with(".rbxlx") {
        return load_place_file(path, name);
    }
    if name.ends_with(".luau") || name.ends_with(".lua") {
        let source = read(path)?;
        // The file is run as a server Script whatever Rojo would make of its name.
        let script_name = script_kind(&name).map_or(name.as_str(), |(_, stem)| stem);
        let script = InstanceBuilder::new("Script")
            .with_name(script_name)
            .with_property("Source", Variant::String(source));
        let mut dom = WeakDom::new(InstanceBuilder::new("DataModel").with_name("Game"));
        let root = dom.root_ref();
        dom.insert(
            root,
            InstanceBuilder::new("ServerScriptService")
                .with_name("ServerScriptService")
                .with_child(script),
        );
        return Ok(Place {
            dom,
            name,
            single_script: true,
            aliases: Vec::new(),
        });
    }
    Err(PlaceError::UnknownKind(path.to_owned()))
}

fn load_place_file(path: &Path, name: String) -> Result<Place, PlaceError> {
    let file = std::fs::File::open(path).map_err(|source| PlaceError::Io {
        path: path.to_owned(),
        source,
    })?;
    let reader = std::io::BufReader::new(file);
    let decoded = if name.ends_with(".rbxl") {
        rbx_binary::from_reader(reader).map_err(|error| error.to_string())
    } else {
        rbx_xml::from_reader_default(reader).map_err(|error| error.to_string())
    };
    let dom = decoded.map_err(|reason| PlaceError::PlaceFile {
        path: path.to_owned(),
        reason,
    })?;
    Ok(Place {
        dom,
        name,
        single_script: false,
        aliases: Vec::new(),
    })
}

fn read(path: &Path) -> Result<String, PlaceError> {
    std::fs::read_to_string(path).map_err(|source| PlaceError::Io {
        path: path.to_owned(),
        source,
    })
}

fn load_project(path: &Path) -> Result<Place, PlaceError> {
    let invalid = |reason: String| PlaceError::Project {
        path: path.to_owned(),
        reason,
    };
    let project: Json = serde_json::from_str(&read(path)?).map_err(|e| invalid(e.to_string()))?;
    let name = project
        .get("name")
        .and_then(Json::as_str)
        .unwrap_or("Game")
        .to_owned();
    let Some(tree) = project.get("tree").and_then(Json::as_object) else {
        return Err(invalid("no \"tree\" object".to_owned()));
    };
    let base = path.parent().unwrap_or(Path::new("."));
    let mut mounts = Vec::new();
    let root = node(base, &[], "Game", tree, &mut mounts).map_err(|reason| match reason {
        NodeError::Io(error) => error,
        NodeError::Invalid(reason) => invalid(reason),
    })?;
    let aliases = aliases(base, &mounts)?;
    Ok(Place {
        dom: WeakDom::new(root.with_class("DataModel").with_name("Game")),
        name,
        single_script: false,
        aliases,
    })
}

/// Where each `$path` of a project went: the file or folder, and the names from `game` to the
/// instance made from it.
type Mounts = Vec<(PathBuf, Vec<String>)>;

/// The aliases of the `.luaurc` beside the project, each turned from a folder into the
/// instance that folder became. Aliases to folders outside every `$path` are left out.
fn aliases(base: &Path, mounts: &Mounts) -> Result<Vec<(String, Vec<String>)>, PlaceError> {
    let path = base.join(".luaurc");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let config: Json = serde_json::from_str(&read(&path)?).map_err(|e| PlaceError::Project {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let mut found = Vec::new();
    let Some(aliases) = config.get("aliases").and_then(Json::as_object) else {
        return Ok(found);
    };
    for (alias, target) in aliases {
        let Some(target) = target.as_str() else {
            continue;
        };
        let Ok(target) = base.join(target).canonicalize() else {
            continue;
        };
        for (mount, instance) in mounts {
            let Ok(mount) = mount.canonicalize() else {
                continue;
            };
            if let Ok(rest) = target.strip_prefix(&mount) {
                let mut names = instance.clone();
                names.extend(rest.components().map(|c| {
                    let name = c.as_os_str().to_string_lossy();
                    script_kind(&name).map_or(name.to_string(), |(_, stem)| stem.to_owned())
                }));
                found.push((alias.clone(), names));
                break;
            }
        }
    }
    Ok(found)
}

enum NodeError {
    Io(PlaceError),
    Invalid(String),
}

impl From<PlaceError> for NodeError {
    fn from(error: PlaceError) -> Self {
        NodeError::Io(error)
    }
}

/// One node of a project tree: `$className`, `$path`, `$properties`, `$attributes`, and the
/// other keys as children. `parents` are the names from `game` down to the node's parent.
fn node(
    base: &Path,
    parents: &[String],
    name: &str,
    json: &Map<String, Json>,
    mounts: &mut Mounts,
) -> Result<InstanceBuilder, NodeError> {
    let here: Vec<String> = if parents.is_empty() && name == "Game" {
        Vec::new()
    } else {
        parents.iter().cloned().chain([name.to_owned()]).collect()
    };
    let mut builder = match json.get("$path").and_then(Json::as_str) {
        Some(relative) => {
            mounts.push((base.join(relative), here.clone()));
            from_path(&base.join(relative), name)?
        }
        None => {
            let class = json
                .get("$className")
                .and_then(Json::as_str)
                .map(str::to_owned)
                .or_else(|| is_service(name).then(|| name.to_owned()))
                .ok_or_else(|| {
                    NodeError::Invalid(format!("{name} has neither $className nor $path"))
                })?;
            InstanceBuilder::new(class).with_name(name)
        }
    };
    let class = match json.get("$className").and_then(Json::as_str) {
        Some(class) => Some(class),
        // A service mapped onto a folder stays that service, as in Rojo.
        None if is_service(name) => Some(name),
        None => None,
    };
    if let Some(class) = class {
        builder = builder.with_class(class);
    }
    if let Some(properties) = json.get("$properties").and_then(Json::as_object) {
        for (property, value) in properties {
            if let Some(value) = property_value(class, property, value) {
                builder = builder.with_property(property.as_str(), value);
            }
        }
    }
    if let Some(attributes) = json.get("$attributes").and_then(Json::as_object) {
        let mut all = Attributes::new();
        for (attribute, value) in attributes {
            if let Some(value) = variant(value) {
                all.insert(attribute.clone(), value);
            }
        }
        builder = builder.with_property("Attributes", Variant::Attributes(all));
    }
    for (child, value) in json {
        if child.starts_with('$') {
            continue;
        }
        let Some(child_json) = value.as_object() else {
            return Err(NodeError::Invalid(format!(
                "{name}.{child} is not an object"
            )));
        };
        builder = builder.with_child(node(base, &here, child, child_json, mounts)?);
    }
    Ok(builder)
}

/// Services a project may name without `$className`, as Rojo allows.
fn is_service(name: &str) -> bool {
    matches!(
        name,
        "Workspace"
            | "Players"
            | "Lighting"
            | "ReplicatedFirst"
            | "ReplicatedStorage"
            | "ServerScriptService"
            | "ServerStorage"
            | "StarterGui"
            | "StarterPack"
            | "StarterPlayer"
            | "Teams"
            | "SoundService"
            | "Chat"
            | "TestService"
            | "HttpService"
    )
}

/// A `$properties` value, typed as Rojo types it: the explicit form (`{"Vector3": [1, 2,
/// 3]}`), or the implicit one read by the property's declared type in Roblox's API
/// (`"Anchored": true`, `"Size": [4, 1, 2]`, `"Material": "Neon"`).
fn property_value(class: Option<&str>, property: &str, value: &Json) -> Option<Variant> {
    use rbx_dom_weak::types::{self as rbx, VariantType};
    use rbx_reflection::DataType;
    if let Json::Object(explicit) = value
        && explicit.len() == 1
        && let Ok(typed) = serde_json::from_value::<Variant>(value.clone())
    {
        return Some(typed);
    }
    let database = rbx_reflection_database::get_bundled();
    let declared = class.and_then(|class| {
        let descriptor = database.classes.get(class)?;
        database
            .superclasses_iter(descriptor)
            .find_map(|class| class.properties.get(property))
            .map(|property| &property.data_type)
    });
    let numbers: Option<Vec<f32>> = value.as_array().map(|items| {
        items
            .iter()
            .filter_map(|n| n.as_f64().map(|n| n as f32))
            .collect()
    });
    let number = value.as_f64();
    match (declared, value) {
        (Some(DataType::Enum(name)), Json::String(item)) => {
            let value = database.enums.get(name)?.items.get(item.as_str())?;
            Some(Variant::Enum(rbx::Enum::from_u32(*value)))
        }
        (Some(DataType::Enum(_)), _) => {
            number.map(|n| Variant::Enum(rbx::Enum::from_u32(n as u32)))
        }
        (Some(DataType::Value(kind)), _) => match (kind, numbers.as_deref()) {
            (VariantType::Float32, _) => number.map(|n| Variant::Float32(n as f32)),
            (VariantType::Float64, _) => number.map(Variant::Float64),
            (VariantType::Int32, _) => number.map(|n| Variant::Int32(n as i32)),
            (VariantType::Int64, _) => number.map(|n| Variant::Int64(n as i64)),
            (VariantType::Vector3, Some([x, y, z])) => {
                Some(Variant::Vector3(rbx::Vector3::new(*x, *y, *z)))
            }
            (VariantType::Vector2, Some([x, y])) => {
                Some(Variant::Vector2(rbx::Vector2::new(*x, *y)))
            }
            (VariantType::Color3, Some([r, g, b])) => {
                Some(Variant::Color3(rbx::Color3::new(*r, *g, *b)))
            }
            (VariantType::NumberRange, Some([min, max])) => {
                Some(Variant::NumberRange(rbx::NumberRange::new(*min, *max)))
            }
            (VariantType::ContentId, _) => value.as_str().map(|id| Variant::ContentId(id.into())),
            _ => variant(value),
        },
        _ => variant(value),
    }
}

/// A JSON attribute value (or an untyped property) as a Variant: strings, booleans and
/// numbers.
fn variant(value: &Json) -> Option<Variant> {
    match value {
        Json::String(text) => Some(Variant::String(text.clone())),
        Json::Bool(b) => Some(Variant::Bool(*b)),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Some(Variant::Int64(i)),
            None => n.as_f64().map(Variant::Float64),
        },
        _ => None,
    }
}

/// The class and instance name Rojo gives a script file, or `None` for other files.
fn script_kind(file_name: &str) -> Option<(&'static str, &str)> {
    for (suffix, class) in [
        (".server.luau", "Script"),
        (".server.lua", "Script"),
        (".client.luau", "LocalScript"),
        (".client.lua", "LocalScript"),
        (".luau", "ModuleScript"),
        (".lua", "ModuleScript"),
    ] {
        if let Some(stem) = file_name.strip_suffix(suffix) {
            return Some((class, stem));
        }
    }
    None
}

/// The instance a file or folder stands for under Rojo's conventions, named `name`.
fn from_path(path: &Path, name: &str) -> Result<InstanceBuilder, NodeError> {
    if path.is_file() {
        let file_name = path.file_name().unwrap_or_default().to_string_lossy();
        if let Some((class, _)) = script_kind(&file_name) {
            return Ok(InstanceBuilder::new(class)
                .with_name(name)
                .with_property("Source", Variant::String(read(path)?)));
        }
        if file_name.ends_with(".txt") {
            return Ok(InstanceBuilder::new("StringValue")
                .with_name(name)
                .with_property("Value", Variant::String(read(path)?)));
        }
        return Err(NodeError::Invalid(format!(
            "{} is not a file Blox can load",
            path.display()
        )));
    }
    let entries = std::fs::read_dir(path).map_err(|source| PlaceError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    let mut builder = InstanceBuilder::new("Folder").with_name(name);
    for file in &files {
        let file_name = file.file_name().unwrap_or_default().to_string_lossy();
        if let Some((class, "init")) = script_kind(&file_name) {
            builder = builder
                .with_class(class)
                .with_property("Source", Variant::String(read(file)?));
        }
    }
    for file in &files {
        let file_name = file
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if file_name.starts_with('.')
            || script_kind(&file_name).is_some_and(|(_, stem)| stem == "init")
        {
            continue;
        }
        if file.is_dir() {
            builder = builder.with_child(from_path(file, &file_name)?);
        } else if let Some((_, stem)) = script_kind(&file_name) {
            builder = builder.with_child(from_path(file, stem)?);
        } else if let Some(stem) = file_name.strip_suffix(".txt") {
            builder = builder.with_child(from_path(file, stem)?);
        }
    }
    Ok(builder)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(folder: &Path, relative: &str, text: &str) {
        let path = folder.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn find(dom: &WeakDom, path: &[&str]) -> Option<rbx_dom_weak::types::Ref> {
        let mut at = dom.root_ref();
        for name in path {
            at = *dom
                .get_by_ref(at)?
                .children()
                .iter()
                .find(|child| dom.get_by_ref(**child).is_some_and(|c| c.name == *name))?;
        }
        Some(at)
    }

    fn class(dom: &WeakDom, path: &[&str]) -> String {
        find(dom, path)
            .map(|r| dom.get_by_ref(r).unwrap().class.to_string())
            .unwrap_or_else(|| format!("missing {path:?}"))
    }

    #[test]
    fn a_rojo_project_follows_rojo_file_conventions() {
        let folder = tempfile::tempdir().unwrap();
        let root = folder.path();
        write(
            root,
            "default.project.json",
            r#"{
                "name": "Tycoon",
                "tree": {
                    "$className": "DataModel",
                    "ServerScriptService": { "$path": "src/server" },
                    "ReplicatedStorage": {
                        "Shared": { "$path": "src/shared" },
                        "Config": { "$className": "Configuration", "$attributes": { "Rate": 2 } }
                    },
                    "Workspace": {
                        "Cash": { "$className": "IntValue", "$properties": { "Value": 5 } },
                        "Floor": {
                            "$className": "Part",
                            "$properties": {
                                "Anchored": true,
                                "Size": [64, 1, 64],
                                "Material": "Neon",
                                "Transparency": 0.5,
                                "Color": { "Color3": [1, 0, 0] }
                            }
                        }
                    }
                }
            }"#,
        );
        write(root, "src/server/main.server.luau", "print('main')");
        write(root, "src/server/Helper.luau", "return {}");
        write(root, "src/server/ui.client.luau", "print('client')");
        write(root, "src/shared/Util/init.luau", "return 1");
        write(root, "src/shared/Util/Child.lua", "return 2");
        write(root, "src/shared/Notes.txt", "hello");
        write(root, "src/shared/.hidden.luau", "return 3");
        write(
            root,
            ".luaurc",
            r#"{ "aliases": { "Shared": "./src/shared", "Util": "src/shared/Util", "Nowhere": "elsewhere" } }"#,
        );

        let place = load(root).unwrap();
        let shared = ["ReplicatedStorage", "Shared"].map(String::from).to_vec();
        let util = ["ReplicatedStorage", "Shared", "Util"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            place.aliases,
            [("Shared".to_owned(), shared), ("Util".to_owned(), util)],
            "aliases point at the instances their folders became; unknown folders are left out"
        );
        assert_eq!(place.name, "Tycoon");
        assert!(!place.single_script);
        let dom = &place.dom;
        assert_eq!(class(dom, &[]), "DataModel");
        assert_eq!(class(dom, &["ServerScriptService"]), "ServerScriptService");
        assert_eq!(class(dom, &["ServerScriptService", "main"]), "Script");
        assert_eq!(
            class(dom, &["ServerScriptService", "Helper"]),
            "ModuleScript"
        );
        assert_eq!(class(dom, &["ServerScriptService", "ui"]), "LocalScript");
        assert_eq!(
            class(dom, &["ReplicatedStorage", "Shared", "Util"]),
            "ModuleScript"
        );
        assert_eq!(
            class(dom, &["ReplicatedStorage", "Shared", "Util", "Child"]),
            "ModuleScript"
        );
        assert_eq!(
            class(dom, &["ReplicatedStorage", "Shared", "Notes"]),
            "StringValue"
        );
        assert!(find(dom, &["ReplicatedStorage", "Shared", ".hidden"]).is_none());
        assert_eq!(
            class(dom, &["ReplicatedStorage", "Config"]),
            "Configuration"
        );
        let cash = dom
            .get_by_ref(find(dom, &["Workspace", "Cash"]).unwrap())
            .unwrap();
        assert_eq!(
            cash.properties.get(&rbx_dom_weak::ustr("Value")),
            Some(&Variant::Int64(5))
        );
        let floor = dom
            .get_by_ref(find(dom, &["Workspace", "Floor"]).unwrap())
            .unwrap();
        let property = |name: &str| floor.properties.get(&rbx_dom_weak::ustr(name)).cloned();
        use rbx_dom_weak::types as rbx;
        assert_eq!(property("Anchored"), Some(Variant::Bool(true)));
        assert_eq!(
            property("Size"),
            Some(Variant::Vector3(rbx::Vector3::new(64.0, 1.0, 64.0)))
        );
        assert!(
            matches!(property("Material"), Some(Variant::Enum(_))),
            "{:?}",
            property("Material")
        );
        assert_eq!(property("Transparency"), Some(Variant::Float32(0.5)));
        assert_eq!(
            property("Color"),
            Some(Variant::Color3(rbx::Color3::new(1.0, 0.0, 0.0)))
        );
        let util = dom
            .get_by_ref(find(dom, &["ReplicatedStorage", "Shared", "Util"]).unwrap())
            .unwrap();
        assert_eq!(
            util.properties.get(&rbx_dom_weak::ustr("Source")),
            Some(&Variant::String("return 1".to_owned()))
        );
    }

    #[test]
    fn a_single_script_is_a_script_in_server_script_service() {
        let folder = tempfile::tempdir().unwrap();
        write(folder.path(), "game.server.luau", "print(1)");
        let place = load(&folder.path().join("game.server.luau")).unwrap();
        assert!(place.single_script);
        assert_eq!(
            class(&place.dom, &["ServerScriptService", "game"]),
            "Script"
        );
    }

    #[test]
    fn place_files_load_in_both_formats() {
        let mut saved = WeakDom::new(InstanceBuilder::new("DataModel"));
        let root = saved.root_ref();
        let service = saved.insert(
            root,
            InstanceBuilder::new("ServerScriptService").with_name("ServerScriptService"),
        );
        saved.insert(
            service,
            InstanceBuilder::new("Script")
                .with_name("Main")
                .with_property(
                    "Source",
                    Variant::String("print('from a place')".to_owned()),
                ),
        );
        let folder = tempfile::tempdir().unwrap();
        let binary = folder.path().join("game.rbxl");
        let xml = folder.path().join("game.rbxlx");
        let services = saved.root().children().to_vec();
        rbx_binary::to_writer(std::fs::File::create(&binary).unwrap(), &saved, &services).unwrap();
        rbx_xml::to_writer_default(std::fs::File::create(&xml).unwrap(), &saved, &services)
            .unwrap();
        for path in [binary, xml] {
            let place = load(&path).unwrap();
            assert!(!place.single_script);
            let main = find(&place.dom, &["ServerScriptService", "Main"]).expect("Main loads");
            let main = place.dom.get_by_ref(main).unwrap();
            assert_eq!(main.class, "Script");
            assert_eq!(
                main.properties.get(&rbx_dom_weak::ustr("Source")),
                Some(&Variant::String("print('from a place')".to_owned())),
                "{}",
                path.display()
            );
        }
        std::fs::write(folder.path().join("junk.rbxl"), "not a place").unwrap();
        let error = load(&folder.path().join("junk.rbxl")).unwrap_err();
        assert!(
            error.to_string().starts_with("invalid place file"),
            "{error}"
        );
    }

    #[test]
    fn bad_projects_are_clear_errors() {
        let folder = tempfile::tempdir().unwrap();
        write(folder.path(), "broken.project.json", "{ not json");
        let error = load(&folder.path().join("broken.project.json")).unwrap_err();
        assert!(error.to_string().starts_with("invalid project"), "{error}");
        write(folder.path(), "empty.project.json", r#"{ "name": "x" }"#);
        let error = load(&folder.path().join("empty.project.json")).unwrap_err();
        assert!(error.to_string().contains("no \"tree\""), "{error}");
        assert!(matches!(
            load(&folder.path().join("notes.md")),
            Err(PlaceError::UnknownKind(_))
        ));
        assert!(matches!(load(folder.path()), Err(PlaceError::Io { .. })));
    }
}
