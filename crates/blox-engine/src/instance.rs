//! Instances: the DataModel tree that scripts walk, as host userdata.
//!
//! The tree itself is an `rbx_dom_weak::WeakDom` (the rojo-rbx crates' model of Roblox
//! instances), so trees loaded from Rojo projects and place files, and trees built by scripts,
//! are the same thing. What a running server adds to the plain tree lives beside it, keyed by
//! the instance's `Ref`: its signals, its callbacks, whether it was destroyed, and the one Luau
//! userdata that stands for it. One userdata per instance keeps `==` and table keys working
//! (`data[player] = ...`), as Roblox scripts expect.
//!
//! That userdata is held weakly: when Luau has collected the userdata of every instance of a
//! parentless subtree (a Player after leaving, a part a script created and dropped), the
//! subtree leaves the tree too, so a long-running server does not grow with every join.
//!
//! Every instance is the same userdata type, [`Instance`]; what a class adds (a `Value`, an
//! `Event`, `GetPlayers`) is looked up by class name when a member is read, so classes stay
//! data, not types. Parent changes fire Roblox's events in Roblox's order: `DescendantRemoving`
//! and `ChildRemoved` on the old ancestors, the move, then `ChildAdded`, `DescendantAdded`,
//! `AncestryChanged` and `Changed("Parent")`.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::Duration;

use blox_scheduler::{Scheduler, Signal};
use mlua::{
    AnyUserData, Function, IntoLuaMulti, Lua, MetaMethod, MultiValue, UserData, UserDataFields,
    UserDataMethods, Value,
};
use rbx_dom_weak::types::{Attributes, Ref, Variant, VariantType};
use rbx_dom_weak::{InstanceBuilder, WeakDom};
use rbx_reflection::DataType;

/// How long `WaitForChild` waits without a timeout before warning of an infinite yield.
const INFINITE_YIELD_WARNING: Duration = Duration::from_secs(5);
/// The longest attribute name Roblox accepts.
const ATTRIBUTE_NAME_LIMIT: usize = 100;

/// The classes `Instance.new` creates, with the value a `ValueBase` starts with.
const CREATABLE: &[&str] = &[
    "Folder",
    "Model",
    "Configuration",
    "Script",
    "ModuleScript",
    "BindableEvent",
    "BindableFunction",
    "RemoteEvent",
    "RemoteFunction",
    "IntValue",
    "NumberValue",
    "StringValue",
    "BoolValue",
    "ObjectValue",
    "Part",
];

/// The classes a class inherits from, nearest first (`Instance` is implied).
fn superclasses(class: &str) -> &'static [&'static str] {
    match class {
        "Workspace" => &["WorldRoot", "Model", "PVInstance"],
        "Model" => &["PVInstance"],
        "Part" => &["BasePart", "PVInstance"],
        "Script" => &["BaseScript", "LuaSourceContainer"],
        "ModuleScript" => &["LuaSourceContainer"],
        "IntValue" | "NumberValue" | "StringValue" | "BoolValue" | "ObjectValue" => &["ValueBase"],
        "DataModel" => &["ServiceProvider"],
        _ => &[],
    }
}

/// True when `class` is `ancestor` or inherits from it: by Roblox's class hierarchy, or for
/// classes Roblox's database does not know, by Blox's own list.
pub fn class_is_a(class: &str, ancestor: &str) -> bool {
    class == ancestor
        || ancestor == "Instance"
        || crate::reflection::is_a(class, ancestor)
            .unwrap_or_else(|| superclasses(class).contains(&ancestor))
}

/// The value a new `ValueBase` holds.
fn default_value(class: &str) -> Option<Variant> {
    Some(match class {
        "IntValue" => Variant::Int64(0),
        "NumberValue" => Variant::Float64(0.0),
        "StringValue" => Variant::String(String::new()),
        "BoolValue" => Variant::Bool(false),
        "ObjectValue" => Variant::Ref(Ref::none()),
        _ => return None,
    })
}

/// What a running server keeps beside one instance.
#[derive(Default)]
struct Extras {
    child_added: Signal,
    child_removed: Signal,
    descendant_added: Signal,
    descendant_removing: Signal,
    destroying: Signal,
    ancestry_changed: Signal,
    changed: Signal,
    attribute_changed: Signal,
    property_signals: RefCell<HashMap<String, Signal>>,
    attribute_signals: RefCell<HashMap<String, Signal>>,
    /// `BindableEvent.Event` or `RemoteEvent.OnServerEvent`.
    event: Signal,
    /// `BindableFunction.OnInvoke` or `RemoteFunction.OnServerInvoke`.
    callback: RefCell<Option<Function>>,
}

impl Extras {
    fn signals(&self) -> Vec<Signal> {
        let mut signals = vec![
            self.child_added.clone(),
            self.child_removed.clone(),
            self.descendant_added.clone(),
            self.descendant_removing.clone(),
            self.destroying.clone(),
            self.ancestry_changed.clone(),
            self.changed.clone(),
            self.attribute_changed.clone(),
            self.event.clone(),
        ];
        signals.extend(self.property_signals.borrow().values().cloned());
        signals.extend(self.attribute_signals.borrow().values().cloned());
        signals
    }
}

/// The instance tree of one VM and everything the server keeps beside it.
pub struct Tree {
    dom: RefCell<WeakDom>,
    game: Ref,
    extras: RefCell<HashMap<Ref, Rc<Extras>>>,
    /// The userdata of each instance, by `Ref`, in a weak-valued Luau table.
    handles: mlua::Table,
    /// Instances whose userdata Luau has collected since the last sweep.
    collected: Rc<RefCell<Vec<Ref>>>,
    destroyed: RefCell<HashSet<Ref>>,
    /// Class-specific methods, created once per VM.
    methods: RefCell<HashMap<&'static str, Function>>,
    /// Counts changes to the tree (parents, names, properties, attributes), so observers
    /// such as replication can skip a frame in which nothing changed.
    changes: Cell<u64>,
}

impl std::fmt::Debug for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tree").field("game", &self.game).finish()
    }
}

/// Errors scripts see, worded as Roblox words them.
fn runtime_error(message: String) -> mlua::Error {
    mlua::Error::RuntimeError(message)
}

impl Tree {
    /// A tree holding only `game` (a DataModel named "Game") with `services` under it, and
    /// installed as the VM's tree.
    pub fn install(lua: &Lua, services: &[&str]) -> mlua::Result<Rc<Tree>> {
        let mut dom = WeakDom::new(InstanceBuilder::new("DataModel").with_name("Game"));
        let game = dom.root_ref();
        for service in services {
            let instance = dom.insert(game, InstanceBuilder::new(*service).with_name(*service));
            // `game.Workspace` is a property of DataModel in Roblox's API, pointing here.
            if *service == "Workspace" {
                dom.root_mut()
                    .properties
                    .insert(rbx_dom_weak::ustr("Workspace"), Variant::Ref(instance));
            }
        }
        let handles = lua.create_table()?;
        let weak_values = lua.create_table()?;
        weak_values.raw_set("__mode", "v")?;
        handles.set_metatable(Some(weak_values))?;
        let tree = Rc::new(Tree {
            dom: RefCell::new(dom),
            game,
            extras: RefCell::default(),
            handles,
            collected: Rc::default(),
            destroyed: RefCell::default(),
            methods: RefCell::default(),
            changes: Cell::new(0),
        });
        lua.set_app_data(Rc::clone(&tree));
        Ok(tree)
    }

    /// The tree of `lua`'s VM.
    pub fn of(lua: &Lua) -> Rc<Tree> {
        lua.app_data_ref::<Rc<Tree>>()
            .map(|tree| Rc::clone(&tree))
            .expect("the engine installs a Tree in every VM")
    }

    /// `game`.
    pub fn game(&self) -> Ref {
        self.game
    }

    /// Copies a loaded place into the tree: the children of each service it holds go under
    /// that service of `game`; anything else goes under `game` as it is.
    pub fn mount(&self, place: &WeakDom) {
        let mut dom = self.dom.borrow_mut();
        for top in place.root().children() {
            let Some(loaded) = place.get_by_ref(*top) else {
                continue;
            };
            let service = dom.root().children().iter().copied().find(|child| {
                dom.get_by_ref(*child)
                    .is_some_and(|c| c.name == loaded.name && c.class == loaded.class)
            });
            let (parent, copied) = match service {
                Some(service) => (service, loaded.children().to_vec()),
                None => (self.game, vec![*top]),
            };
            for each in copied {
                let copy = place.clone_into_external(each, &mut dom);
                dom.transfer_within(copy, parent);
            }
        }
    }

    /// The userdata that stands for `instance`, the same one every time.
    pub fn handle(&self, lua: &Lua, instance: Ref) -> mlua::Result<AnyUserData> {
        let key = instance.to_string();
        if let Some(handle) = self.handles.raw_get::<Option<AnyUserData>>(key.as_str())? {
            return Ok(handle);
        }
        let handle = lua.create_userdata(Instance {
            instance,
            collected: Rc::clone(&self.collected),
        })?;
        self.handles.raw_set(key, &handle)?;
        Ok(handle)
    }

    /// Whether Luau still holds the userdata of `instance`.
    fn has_handle(&self, instance: Ref) -> bool {
        self.handles
            .raw_get::<Option<AnyUserData>>(instance.to_string())
            .ok()
            .flatten()
            .is_some()
    }

    /// Removes the parentless subtrees that no Luau code can reach any more: those whose
    /// instances' userdata have all been collected.
    pub fn sweep(&self) {
        let collected = std::mem::take(&mut *self.collected.borrow_mut());
        for instance in collected {
            if self.dom.borrow().get_by_ref(instance).is_none() {
                continue;
            }
            let root = self.ancestors(instance).last().copied().unwrap_or(instance);
            if root == self.game || self.parent(root).is_some() {
                continue;
            }
            let subtree: Vec<Ref> = std::iter::once(root)
                .chain(self.descendants(root))
                .collect();
            if subtree.iter().any(|each| self.has_handle(*each)) {
                continue;
            }
            self.dom.borrow_mut().destroy(root);
            let mut extras = self.extras.borrow_mut();
            let mut destroyed = self.destroyed.borrow_mut();
            for each in subtree {
                extras.remove(&each);
                destroyed.remove(&each);
            }
        }
    }

    /// How many instances the tree holds, `game` included (never empty).
    pub fn instance_count(&self) -> usize {
        self.dom.borrow().descendants().count()
    }

    /// `instances` as a Luau array of their userdata.
    pub fn sequence(&self, lua: &Lua, instances: Vec<Ref>) -> mlua::Result<mlua::Table> {
        let handles = instances
            .into_iter()
            .map(|instance| self.handle(lua, instance))
            .collect::<mlua::Result<Vec<_>>>()?;
        lua.create_sequence_from(handles)
    }

    /// `instance` as a Luau value; nil for the none Ref.
    pub fn value(&self, lua: &Lua, instance: Ref) -> mlua::Result<Value> {
        if instance.is_none() || self.dom.borrow().get_by_ref(instance).is_none() {
            return Ok(Value::Nil);
        }
        Ok(Value::UserData(self.handle(lua, instance)?))
    }

    fn extras(&self, instance: Ref) -> Rc<Extras> {
        Rc::clone(self.extras.borrow_mut().entry(instance).or_default())
    }

    fn observed_extras(&self, instance: Ref) -> Option<Rc<Extras>> {
        self.extras.borrow().get(&instance).cloned()
    }

    /// The class of `instance`.
    pub fn class(&self, instance: Ref) -> String {
        self.dom
            .borrow()
            .get_by_ref(instance)
            .map(|i| i.class.to_string())
            .unwrap_or_default()
    }

    /// The name of `instance`.
    pub fn name(&self, instance: Ref) -> String {
        self.dom
            .borrow()
            .get_by_ref(instance)
            .map(|i| i.name.clone())
            .unwrap_or_default()
    }

    /// The parent of `instance` (the none Ref for no parent).
    pub fn parent(&self, instance: Ref) -> Ref {
        self.dom
            .borrow()
            .get_by_ref(instance)
            .map_or(Ref::none(), |i| i.parent())
    }

    /// The children of `instance`, in order.
    pub fn children(&self, instance: Ref) -> Vec<Ref> {
        self.dom
            .borrow()
            .get_by_ref(instance)
            .map(|i| i.children().to_vec())
            .unwrap_or_default()
    }

    /// Every descendant of `instance`, parents before children.
    pub fn descendants(&self, instance: Ref) -> Vec<Ref> {
        let mut found = Vec::new();
        let mut queue = self.children(instance);
        queue.reverse();
        while let Some(next) = queue.pop() {
            found.push(next);
            let mut children = self.children(next);
            children.reverse();
            queue.extend(children);
        }
        found
    }

    /// The ancestors of `instance`, nearest first.
    pub fn ancestors(&self, instance: Ref) -> Vec<Ref> {
        let mut found = Vec::new();
        let mut next = self.parent(instance);
        while next.is_some() {
            found.push(next);
            next = self.parent(next);
        }
        found
    }

    /// A property of `instance`.
    pub fn property(&self, instance: Ref, name: &str) -> Option<Variant> {
        self.dom
            .borrow()
            .get_by_ref(instance)
            .and_then(|i| i.properties.get(&rbx_dom_weak::ustr(name)).cloned())
    }

    /// Sets a property of `instance` without firing anything (loaders, host code).
    pub fn set_property_quietly(&self, instance: Ref, name: &str, value: Variant) {
        if let Some(i) = self.dom.borrow_mut().get_by_ref_mut(instance) {
            i.properties.insert(rbx_dom_weak::ustr(name), value);
        }
        self.touch();
    }

    /// How many changes the tree has seen; equal counts mean nothing changed in between.
    pub fn changes(&self) -> u64 {
        self.changes.get()
    }

    fn touch(&self) {
        self.changes.set(self.changes.get() + 1);
    }

    /// Sets a property and fires `Changed` and its property signal.
    pub fn set_property(
        &self,
        lua: &Lua,
        instance: Ref,
        name: &str,
        value: Variant,
    ) -> mlua::Result<()> {
        self.set_property_quietly(instance, name, value.clone());
        self.property_changed(lua, instance, name, Some(value))
    }

    fn property_changed(
        &self,
        lua: &Lua,
        instance: Ref,
        name: &str,
        value: Option<Variant>,
    ) -> mlua::Result<()> {
        let Some(extras) = self.observed_extras(instance) else {
            return Ok(());
        };
        let property_signal = extras.property_signals.borrow().get(name).cloned();
        if let Some(signal) = property_signal {
            signal.fire(lua, MultiValue::new())?;
        }
        // A ValueBase's Changed passes the new value; every other class passes the name.
        let value_base = class_is_a(&self.class(instance), "ValueBase");
        match value {
            Some(value) if value_base && name == "Value" => {
                let value = self.variant_to_lua(lua, &value)?;
                extras.changed.fire(lua, value.into_lua_multi(lua)?)
            }
            _ if value_base => Ok(()),
            _ => extras.changed.fire(lua, name.into_lua_multi(lua)?),
        }
    }

    /// Creates an instance of `class` with no parent.
    pub fn create(&self, class: &str, name: &str) -> Ref {
        let mut builder = InstanceBuilder::new(class).with_name(name);
        if let Some(value) = default_value(class) {
            builder = builder.with_property("Value", value);
        }
        self.dom.borrow_mut().insert(Ref::none(), builder)
    }

    /// Moves `instance` under `new_parent` (none for nil) with Roblox's checks and events.
    pub fn set_parent(&self, lua: &Lua, instance: Ref, new_parent: Ref) -> mlua::Result<()> {
        let old_parent = self.parent(instance);
        if old_parent == new_parent {
            return Ok(());
        }
        if instance == self.game {
            return Err(runtime_error(
                "The Parent property of Game is locked".to_owned(),
            ));
        }
        if self.destroyed.borrow().contains(&instance) {
            return Err(runtime_error(format!(
                "The Parent property of {} is locked, current parent: NULL, new parent {}",
                self.name(instance),
                self.name(new_parent)
            )));
        }
        if new_parent == instance || self.ancestors(new_parent).contains(&instance) {
            return Err(runtime_error(format!(
                "Attempt to set parent of {} to {} would result in circular reference",
                self.full_name(instance),
                self.full_name(new_parent)
            )));
        }
        let moved: Vec<Ref> = std::iter::once(instance)
            .chain(self.descendants(instance))
            .collect();
        let old_ancestors: Vec<Ref> = if old_parent.is_some() {
            std::iter::once(old_parent)
                .chain(self.ancestors(old_parent))
                .collect()
        } else {
            Vec::new()
        };
        for ancestor in &old_ancestors {
            if let Some(extras) = self.observed_extras(*ancestor) {
                for descendant in &moved {
                    let value = self.handle(lua, *descendant)?;
                    extras
                        .descendant_removing
                        .fire(lua, value.into_lua_multi(lua)?)?;
                }
            }
        }
        self.dom.borrow_mut().transfer_within(instance, new_parent);
        self.touch();
        if let Some(extras) = self.observed_extras(old_parent) {
            let value = self.handle(lua, instance)?;
            extras.child_removed.fire(lua, value.into_lua_multi(lua)?)?;
        }
        if new_parent.is_some() {
            if let Some(extras) = self.observed_extras(new_parent) {
                let value = self.handle(lua, instance)?;
                extras.child_added.fire(lua, value.into_lua_multi(lua)?)?;
            }
            for ancestor in std::iter::once(new_parent).chain(self.ancestors(new_parent)) {
                if let Some(extras) = self.observed_extras(ancestor) {
                    for descendant in &moved {
                        let value = self.handle(lua, *descendant)?;
                        extras
                            .descendant_added
                            .fire(lua, value.into_lua_multi(lua)?)?;
                    }
                }
            }
        }
        for descendant in &moved {
            if let Some(extras) = self.observed_extras(*descendant) {
                let args = (self.handle(lua, instance)?, self.value(lua, new_parent)?)
                    .into_lua_multi(lua)?;
                extras.ancestry_changed.fire(lua, args)?;
            }
        }
        self.property_changed(lua, instance, "Parent", None)
    }

    /// `Destroy`: fires `Destroying`, sets the parent to nil, locks it and disconnects every
    /// signal of the instance and its descendants.
    pub fn destroy(&self, lua: &Lua, instance: Ref) -> mlua::Result<()> {
        if instance == self.game || self.destroyed.borrow().contains(&instance) {
            return Ok(());
        }
        let all: Vec<Ref> = std::iter::once(instance)
            .chain(self.descendants(instance))
            .collect();
        for each in &all {
            if let Some(extras) = self.observed_extras(*each) {
                extras.destroying.fire(lua, MultiValue::new())?;
            }
        }
        self.set_parent(lua, instance, Ref::none())?;
        let mut destroyed = self.destroyed.borrow_mut();
        for each in all {
            destroyed.insert(each);
            if let Some(extras) = self.extras.borrow_mut().remove(&each) {
                for signal in &extras.signals() {
                    signal.disconnect_all();
                }
            }
        }
        Ok(())
    }

    /// Roblox's `GetFullName`: names from the top ancestor below `game`, joined by dots.
    pub fn full_name(&self, instance: Ref) -> String {
        if instance.is_none() {
            return "NULL".to_owned();
        }
        let mut names = vec![self.name(instance)];
        for ancestor in self.ancestors(instance) {
            if ancestor == self.game {
                break;
            }
            names.push(self.name(ancestor));
        }
        names.reverse();
        names.join(".")
    }

    /// The first child of `instance` named `name`.
    pub fn find_child(&self, instance: Ref, name: &str) -> Option<Ref> {
        let dom = self.dom.borrow();
        dom.get_by_ref(instance)?
            .children()
            .iter()
            .copied()
            .find(|child| dom.get_by_ref(*child).is_some_and(|c| c.name == name))
    }

    /// The first of `candidates` that passes `test`.
    fn first_where(
        &self,
        candidates: Vec<Ref>,
        test: impl Fn(&rbx_dom_weak::Instance) -> bool,
    ) -> Option<Ref> {
        let dom = self.dom.borrow();
        candidates
            .into_iter()
            .find(|r| dom.get_by_ref(*r).is_some_and(&test))
    }

    /// A property value as Luau sees it.
    pub fn variant_to_lua(&self, lua: &Lua, value: &Variant) -> mlua::Result<Value> {
        Ok(match value {
            Variant::String(text) => Value::String(lua.create_string(text)?),
            Variant::Bool(b) => Value::Boolean(*b),
            Variant::Int64(n) => Value::Number(*n as f64),
            Variant::Int32(n) => Value::Number(f64::from(*n)),
            Variant::Float64(n) => Value::Number(*n),
            Variant::Float32(n) => Value::Number(f64::from(*n)),
            Variant::Ref(r) => self.value(lua, *r)?,
            other => crate::datatypes::from_variant(lua, other)?.unwrap_or(Value::Nil),
        })
    }

    fn attributes(&self, instance: Ref) -> Attributes {
        match self.property(instance, "Attributes") {
            Some(Variant::Attributes(attributes)) => attributes,
            _ => Attributes::new(),
        }
    }

    /// `SetAttribute` with Roblox's name and type rules; nil removes the attribute.
    pub fn set_attribute(
        &self,
        lua: &Lua,
        instance: Ref,
        name: &str,
        value: Value,
    ) -> mlua::Result<()> {
        if name.len() > ATTRIBUTE_NAME_LIMIT
            || name.is_empty()
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(runtime_error(format!(
                "Attribute name \"{name}\" is invalid: names must be 1 to 100 alphanumeric characters or underscores"
            )));
        }
        if name.starts_with("RBX") {
            return Err(runtime_error(format!(
                "Attribute name \"{name}\" is reserved: names may not start with RBX"
            )));
        }
        let variant = match &value {
            Value::Nil => None,
            Value::String(text) => Some(Variant::String(text.to_str()?.to_owned())),
            Value::Boolean(b) => Some(Variant::Bool(*b)),
            Value::Integer(n) => Some(Variant::Float64(*n as f64)),
            Value::Number(n) => Some(Variant::Float64(*n)),
            other => match crate::datatypes::to_variant(other) {
                Some(variant) => Some(variant),
                None => {
                    let type_name = match other {
                        Value::UserData(userdata) => userdata
                            .type_name()
                            .map(|name| name.to_string_lossy())
                            .unwrap_or_else(|_| "userdata".to_owned()),
                        other => other.type_name().to_owned(),
                    };
                    return Err(runtime_error(format!(
                        "{type_name} is not a supported attribute type"
                    )));
                }
            },
        };
        let mut attributes = self.attributes(instance);
        let previous = match &variant {
            Some(variant) => attributes.insert(name.to_owned(), variant.clone()),
            None => attributes.remove(name),
        };
        if previous == variant {
            return Ok(());
        }
        self.set_property_quietly(instance, "Attributes", Variant::Attributes(attributes));
        if let Some(extras) = self.observed_extras(instance) {
            let signal = extras.attribute_signals.borrow().get(name).cloned();
            if let Some(signal) = signal {
                signal.fire(lua, MultiValue::new())?;
            }
            extras
                .attribute_changed
                .fire(lua, name.into_lua_multi(lua)?)?;
        }
        Ok(())
    }

    /// `GetAttribute`.
    pub fn attribute(&self, lua: &Lua, instance: Ref, name: &str) -> mlua::Result<Value> {
        match self.attributes(instance).get(name) {
            Some(value) => self.variant_to_lua(lua, value),
            None => Ok(Value::Nil),
        }
    }

    /// A Luau function for a class-specific method, created once per VM.
    pub(crate) fn method(
        &self,
        lua: &Lua,
        name: &'static str,
        body: impl Fn(&Lua, Ref, MultiValue) -> mlua::Result<MultiValue> + 'static,
    ) -> mlua::Result<Function> {
        if let Some(function) = self.methods.borrow().get(name) {
            return Ok(function.clone());
        }
        let function =
            lua.create_function(move |lua, (this, args): (AnyUserData, MultiValue)| {
                let instance = this.borrow::<Instance>()?.instance;
                body(lua, instance, args)
            })?;
        self.methods.borrow_mut().insert(name, function.clone());
        Ok(function)
    }

    /// Fires the `Event` of a BindableEvent or the `OnServerEvent` of a RemoteEvent.
    pub fn fire_event(&self, lua: &Lua, instance: Ref, args: MultiValue) -> mlua::Result<()> {
        self.extras(instance).event.fire(lua, args)
    }

    /// The `OnInvoke` or `OnServerInvoke` callback of `instance`, if set.
    pub fn callback(&self, instance: Ref) -> Option<Function> {
        self.observed_extras(instance)
            .and_then(|extras| extras.callback.borrow().clone())
    }

    /// Builds the error for a member `instance` does not have.
    fn invalid_member(&self, instance: Ref, member: &str) -> mlua::Error {
        runtime_error(format!(
            "{member} is not a valid member of {} \"{}\"",
            self.class(instance),
            self.full_name(instance)
        ))
    }
}

/// A hook that serves class-specific members the tree does not know itself (`game`'s
/// services and identity, Players' events and lists), installed by the engine.
pub type MemberHook = Rc<dyn Fn(&Lua, Ref, &str, &str) -> mlua::Result<Option<Value>>>;

/// The engine's class-specific member lookup, kept in the VM's app data.
pub struct Members(pub MemberHook);

/// The userdata of one instance. When Luau collects it, the instance is noted for the next
/// [`Tree::sweep`].
pub struct Instance {
    instance: Ref,
    collected: Rc<RefCell<Vec<Ref>>>,
}

impl Instance {
    /// The instance a Luau value stands for, if it is one.
    pub fn from_value(value: &Value) -> Option<Ref> {
        match value {
            Value::UserData(userdata) => userdata.borrow::<Instance>().ok().map(|i| i.instance),
            _ => None,
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // Luau may collect during any allocation, even while the tree is borrowed: only note
        // it here; the sweep does the work.
        if let Ok(mut collected) = self.collected.try_borrow_mut() {
            collected.push(self.instance);
        }
    }
}

fn instance_argument(value: &Value, position: usize, method: &str) -> mlua::Result<Ref> {
    match value {
        Value::Nil => Ok(Ref::none()),
        other => Instance::from_value(other).ok_or_else(|| {
            runtime_error(format!(
                "Unable to cast {} to Instance (argument {position} of {method})",
                other.type_name()
            ))
        }),
    }
}

impl UserData for Instance {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field(MetaMethod::Type, "Instance");
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::ToString, |lua, this, ()| {
            Ok(Tree::of(lua).name(this.instance))
        });
        methods.add_meta_method(MetaMethod::Index, |lua, this, member: String| {
            index(lua, this.instance, &member)
        });
        methods.add_meta_method(
            MetaMethod::NewIndex,
            |lua, this, (member, value): (String, Value)| {
                new_index(lua, this.instance, &member, value)
            },
        );
        methods.add_method(
            "FindFirstChild",
            |lua, this, (name, recursive): (String, Option<bool>)| {
                let tree = Tree::of(lua);
                if recursive.unwrap_or(false) {
                    let descendants = tree.descendants(this.instance);
                    return first(lua, &tree, descendants, |i| i.name == name);
                }
                tree.value(
                    lua,
                    tree.find_child(this.instance, &name)
                        .unwrap_or_else(Ref::none),
                )
            },
        );
        methods.add_method("FindFirstChildOfClass", |lua, this, class: String| {
            let tree = Tree::of(lua);
            let children = tree.children(this.instance);
            first(lua, &tree, children, |i| i.class == class.as_str())
        });
        methods.add_method(
            "FindFirstChildWhichIsA",
            |lua, this, (class, recursive): (String, Option<bool>)| {
                let tree = Tree::of(lua);
                let candidates = if recursive.unwrap_or(false) {
                    tree.descendants(this.instance)
                } else {
                    tree.children(this.instance)
                };
                first(lua, &tree, candidates, |i| class_is_a(&i.class, &class))
            },
        );
        methods.add_method("FindFirstAncestor", |lua, this, name: String| {
            let tree = Tree::of(lua);
            let ancestors = tree.ancestors(this.instance);
            first(lua, &tree, ancestors, |i| i.name == name)
        });
        methods.add_method("FindFirstAncestorOfClass", |lua, this, class: String| {
            let tree = Tree::of(lua);
            let ancestors = tree.ancestors(this.instance);
            first(lua, &tree, ancestors, |i| i.class == class.as_str())
        });
        methods.add_method("FindFirstAncestorWhichIsA", |lua, this, class: String| {
            let tree = Tree::of(lua);
            let ancestors = tree.ancestors(this.instance);
            first(lua, &tree, ancestors, |i| class_is_a(&i.class, &class))
        });
        methods.add_async_method(
            "WaitForChild",
            |lua, this, (name, timeout): (String, Option<f64>)| async move {
                let tree = Tree::of(&lua);
                let instance = this.instance;
                let scheduler = Scheduler::of(&lua);
                let started = scheduler.now();
                let mut warned = false;
                loop {
                    if let Some(child) = tree.find_child(instance, &name) {
                        return tree.value(&lua, child);
                    }
                    let waited = scheduler.now().saturating_sub(started);
                    match timeout {
                        Some(limit) if waited.as_secs_f64() >= limit => return Ok(Value::Nil),
                        None if !warned && waited >= INFINITE_YIELD_WARNING => {
                            warned = true;
                            let warn: Function = lua.globals().get("warn")?;
                            warn.call::<()>(format!(
                                "Infinite yield possible on '{}:WaitForChild(\"{name}\")'",
                                tree.full_name(instance)
                            ))?;
                        }
                        _ => {}
                    }
                    scheduler.sleep(Duration::ZERO).await;
                }
            },
        );
        methods.add_method("GetChildren", |lua, this, ()| {
            let tree = Tree::of(lua);
            tree.sequence(lua, tree.children(this.instance))
        });
        methods.add_method("GetDescendants", |lua, this, ()| {
            let tree = Tree::of(lua);
            tree.sequence(lua, tree.descendants(this.instance))
        });
        methods.add_method("IsA", |lua, this, class: String| {
            Ok(class_is_a(&Tree::of(lua).class(this.instance), &class))
        });
        methods.add_method("IsDescendantOf", |lua, this, ancestor: Value| {
            let ancestor = instance_argument(&ancestor, 1, "IsDescendantOf")?;
            Ok(Tree::of(lua).ancestors(this.instance).contains(&ancestor))
        });
        methods.add_method("IsAncestorOf", |lua, this, descendant: Value| {
            let descendant = instance_argument(&descendant, 1, "IsAncestorOf")?;
            Ok(Tree::of(lua).ancestors(descendant).contains(&this.instance))
        });
        methods.add_method("GetFullName", |lua, this, ()| {
            Ok(Tree::of(lua).full_name(this.instance))
        });
        methods.add_method("Destroy", |lua, this, ()| {
            Tree::of(lua).destroy(lua, this.instance)
        });
        methods.add_method("Remove", |lua, this, ()| {
            Tree::of(lua).set_parent(lua, this.instance, Ref::none())
        });
        methods.add_method("ClearAllChildren", |lua, this, ()| {
            let tree = Tree::of(lua);
            for child in tree.children(this.instance) {
                tree.destroy(lua, child)?;
            }
            Ok(())
        });
        methods.add_method("Clone", |lua, this, ()| {
            let tree = Tree::of(lua);
            let archivable = !matches!(
                tree.property(this.instance, "Archivable"),
                Some(Variant::Bool(false))
            );
            if !archivable || this.instance == tree.game {
                return Ok(Value::Nil);
            }
            let copy = tree.dom.borrow_mut().clone_within(this.instance);
            tree.value(lua, copy)
        });
        methods.add_method("GetAttribute", |lua, this, name: String| {
            Tree::of(lua).attribute(lua, this.instance, &name)
        });
        methods.add_method(
            "SetAttribute",
            |lua, this, (name, value): (String, Value)| {
                Tree::of(lua).set_attribute(lua, this.instance, &name, value)
            },
        );
        methods.add_method("GetAttributes", |lua, this, ()| {
            let tree = Tree::of(lua);
            let table = lua.create_table()?;
            for (name, value) in tree.attributes(this.instance).iter() {
                table.raw_set(name.as_str(), tree.variant_to_lua(lua, value)?)?;
            }
            Ok(table)
        });
        methods.add_method("GetAttributeChangedSignal", |lua, this, name: String| {
            let extras = Tree::of(lua).extras(this.instance);
            let signal = extras
                .attribute_signals
                .borrow_mut()
                .entry(name)
                .or_default()
                .clone();
            Ok(signal)
        });
        methods.add_method("GetPropertyChangedSignal", |lua, this, name: String| {
            let tree = Tree::of(lua);
            if !has_property(&tree, this.instance, &name) {
                return Err(runtime_error(format!(
                    "{name} is not a valid property name."
                )));
            }
            let extras = tree.extras(this.instance);
            let signal = extras
                .property_signals
                .borrow_mut()
                .entry(name)
                .or_default()
                .clone();
            Ok(signal)
        });
    }
}

/// The first of `candidates` that passes `test`, as a Luau value (nil when none does): what
/// every `FindFirst…` method returns.
fn first(
    lua: &Lua,
    tree: &Tree,
    candidates: Vec<Ref>,
    test: impl Fn(&rbx_dom_weak::Instance) -> bool,
) -> mlua::Result<Value> {
    tree.value(
        lua,
        tree.first_where(candidates, test).unwrap_or_else(Ref::none),
    )
}

/// Whether `name` is a property scripts can watch on `instance`.
fn has_property(tree: &Tree, instance: Ref, name: &str) -> bool {
    let class = tree.class(instance);
    matches!(name, "Name" | "Parent" | "ClassName" | "Archivable")
        || (name == "Value" && class_is_a(&class, "ValueBase"))
        || tree.property(instance, name).is_some()
        || crate::reflection::property(&class, name).is_some()
}

/// Reads a member: properties, events, class methods, then children by name.
fn index(lua: &Lua, instance: Ref, member: &str) -> mlua::Result<Value> {
    let tree = Tree::of(lua);
    let signal = |pick: fn(&Extras) -> &Signal| -> mlua::Result<Value> {
        let extras = tree.extras(instance);
        Ok(Value::UserData(lua.create_userdata(pick(&extras).clone())?))
    };
    match member {
        "Name" => return Ok(Value::String(lua.create_string(tree.name(instance))?)),
        "ClassName" => return Ok(Value::String(lua.create_string(tree.class(instance))?)),
        "Parent" => return tree.value(lua, tree.parent(instance)),
        "Archivable" => {
            return Ok(Value::Boolean(!matches!(
                tree.property(instance, "Archivable"),
                Some(Variant::Bool(false))
            )));
        }
        "ChildAdded" => return signal(|e| &e.child_added),
        "ChildRemoved" => return signal(|e| &e.child_removed),
        "DescendantAdded" => return signal(|e| &e.descendant_added),
        "DescendantRemoving" => return signal(|e| &e.descendant_removing),
        "Destroying" => return signal(|e| &e.destroying),
        "AncestryChanged" => return signal(|e| &e.ancestry_changed),
        "Changed" => return signal(|e| &e.changed),
        "AttributeChanged" => return signal(|e| &e.attribute_changed),
        _ => {}
    }
    let class = tree.class(instance);
    if let Some(value) = class_member(lua, &tree, instance, &class, member)? {
        return Ok(value);
    }
    let hook = lua
        .app_data_ref::<Members>()
        .map(|members| Rc::clone(&members.0));
    if let Some(hook) = hook
        && let Some(value) = hook(lua, instance, &class, member)?
    {
        return Ok(value);
    }
    if let Some(value) = reflected_value(lua, &tree, instance, &class, member)? {
        return Ok(value);
    }
    match tree.find_child(instance, member) {
        Some(child) => tree.value(lua, child),
        None => Err(tree.invalid_member(instance, member)),
    }
}

/// A property Roblox's API declares for the class: its stored value, else its default.
fn reflected_value(
    lua: &Lua,
    tree: &Tree,
    instance: Ref,
    class: &str,
    member: &str,
) -> mlua::Result<Option<Value>> {
    let Some(property) = crate::reflection::property(class, member) else {
        return Ok(None);
    };
    let stored = tree
        .property(instance, property.stored_as)
        .or_else(|| property.default_value().cloned());
    let value = match (property.data_type, stored) {
        (_, None) => Value::Nil,
        (DataType::Enum(name), Some(Variant::Enum(value))) => {
            crate::enums::item(lua, name, i64::from(value.to_u32()))?
                .map_or(Value::Nil, Value::UserData)
        }
        (_, Some(Variant::ContentId(id))) => Value::String(lua.create_string(id.as_str())?),
        (_, Some(other)) => tree.variant_to_lua(lua, &other)?,
    };
    Ok(Some(value))
}

/// Assigns a property Roblox's API declares for the class, with its declared type. Returns
/// false when the class has no such property.
fn reflected_assign(
    lua: &Lua,
    tree: &Tree,
    instance: Ref,
    class: &str,
    member: &str,
    value: &Value,
) -> mlua::Result<bool> {
    let Some(property) = crate::reflection::property(class, member) else {
        return Ok(false);
    };
    if !property.writable {
        return Err(runtime_error(format!(
            "Unable to assign property {member}. Property is read only"
        )));
    }
    let variant = lua_to_variant(value, property.data_type).ok_or_else(|| {
        let got = match value {
            Value::UserData(userdata) => userdata
                .type_name()
                .map(|name| name.to_string_lossy())
                .unwrap_or_else(|_| "userdata".to_owned()),
            other => other.type_name().to_owned(),
        };
        runtime_error(format!(
            "Unable to assign property {member}. {} expected, got {got}",
            crate::reflection::type_name(property.data_type)
        ))
    })?;
    tree.set_property(lua, instance, property.stored_as, variant)?;
    Ok(true)
}

/// A Luau value as the stored value of a property declared as `data_type`, if it fits.
fn lua_to_variant(value: &Value, data_type: &DataType) -> Option<Variant> {
    let number = crate::palette::as_number(value);
    match data_type {
        DataType::Enum(name) => match value {
            Value::UserData(item) => {
                let item = item.borrow::<crate::enums::EnumItem>().ok()?;
                let (enum_name, value) = item.key();
                (enum_name == *name).then(|| crate::reflection::enum_variant(value as u32))
            }
            Value::String(text) => crate::reflection::enum_value(name, &text.to_str().ok()?)
                .map(crate::reflection::enum_variant),
            _ => number.map(|n| crate::reflection::enum_variant(n as u32)),
        },
        DataType::Value(kind) => match (kind, value) {
            (VariantType::Bool, Value::Boolean(b)) => Some(Variant::Bool(*b)),
            (VariantType::Float32, _) => number.map(|n| Variant::Float32(n as f32)),
            (VariantType::Float64, _) => number.map(Variant::Float64),
            (VariantType::Int32, _) => number.map(|n| Variant::Int32(n as i32)),
            (VariantType::Int64, _) => number.map(|n| Variant::Int64(n as i64)),
            (VariantType::String, Value::String(text)) => {
                Some(Variant::String(text.to_string_lossy()))
            }
            (VariantType::String, _) => {
                number.map(|n| Variant::String(Value::Number(n).to_string().unwrap_or_default()))
            }
            (VariantType::ContentId, Value::String(text)) => {
                Some(Variant::ContentId(text.to_string_lossy().into()))
            }
            (VariantType::Ref, Value::Nil) => Some(Variant::Ref(Ref::none())),
            (VariantType::Ref, other) => Instance::from_value(other).map(Variant::Ref),
            (kind, other) => {
                crate::datatypes::to_variant(other).filter(|variant| variant.ty() == *kind)
            }
        },
        _ => None,
    }
}

/// The members a class adds, for the classes the tree implements itself.
fn class_member(
    lua: &Lua,
    tree: &Tree,
    instance: Ref,
    class: &str,
    member: &str,
) -> mlua::Result<Option<Value>> {
    let event = || -> mlua::Result<Option<Value>> {
        let extras = tree.extras(instance);
        Ok(Some(Value::UserData(
            lua.create_userdata(extras.event.clone())?,
        )))
    };
    Ok(match (class, member) {
        (_, "Value") if class_is_a(class, "ValueBase") => {
            let value = tree
                .property(instance, "Value")
                .or_else(|| default_value(class));
            Some(match value {
                Some(value) => tree.variant_to_lua(lua, &value)?,
                None => Value::Nil,
            })
        }
        ("BindableEvent", "Event") | ("RemoteEvent", "OnServerEvent") => event()?,
        ("BindableEvent", "Fire") => Some(Value::Function(tree.method(
            lua,
            "Fire",
            |lua, this, args| {
                let extras = Tree::of(lua).extras(this);
                extras.event.fire(lua, args)?;
                Ok(MultiValue::new())
            },
        )?)),
        ("BindableFunction", "Invoke") => Some(Value::Function(invoke_function(lua, tree)?)),
        ("RemoteEvent", "FireClient") => Some(Value::Function(tree.method(
            lua,
            "FireClient",
            |lua, remote, args| {
                let mut args = args.into_iter();
                let player = args
                    .next()
                    .as_ref()
                    .and_then(Instance::from_value)
                    .filter(|player| Tree::of(lua).class(*player) == "Player")
                    .ok_or_else(|| {
                        runtime_error(
                            "FireClient: player argument must be a Player object".to_owned(),
                        )
                    })?;
                crate::net::fire_client(lua, remote, player, args.collect())?;
                Ok(MultiValue::new())
            },
        )?)),
        ("RemoteEvent", "FireAllClients") => Some(Value::Function(tree.method(
            lua,
            "FireAllClients",
            |lua, remote, args| {
                crate::net::fire_all_clients(lua, remote, args)?;
                Ok(MultiValue::new())
            },
        )?)),
        ("RemoteFunction", "InvokeClient") => Some(Value::Function(tree.method(
            lua,
            "InvokeClient",
            |_, _, _| {
                Err(runtime_error(
                    "InvokeClient is not supported by Blox: a server must not wait on a client"
                        .to_owned(),
                ))
            },
        )?)),
        ("BindableFunction", "OnInvoke") | ("RemoteFunction", "OnServerInvoke") => {
            return Err(runtime_error(format!(
                "{member} is a callback member of {class}; you can only set the callback value, get is not available"
            )));
        }
        _ => None,
    })
}

/// `BindableFunction:Invoke(...)`: runs the `OnInvoke` callback and returns what it returns,
/// yielding while it yields.
fn invoke_function(lua: &Lua, tree: &Tree) -> mlua::Result<Function> {
    if let Some(function) = tree.methods.borrow().get("Invoke") {
        return Ok(function.clone());
    }
    let function =
        lua.create_async_function(|lua, (this, args): (AnyUserData, MultiValue)| async move {
            let instance = this.borrow::<Instance>()?.instance;
            let callback = Tree::of(&lua).extras(instance).callback.borrow().clone();
            let Some(callback) = callback else {
                return Err(runtime_error(
                    "BindableFunction:Invoke() has no OnInvoke callback".to_owned(),
                ));
            };
            let thread = lua.create_thread(callback)?;
            let results: MultiValue = thread.into_async(args)?.await?;
            Ok(results)
        })?;
    tree.methods.borrow_mut().insert("Invoke", function.clone());
    Ok(function)
}

/// Writes a member: Name, Parent, Archivable, Value, callbacks.
fn new_index(lua: &Lua, instance: Ref, member: &str, value: Value) -> mlua::Result<()> {
    let tree = Tree::of(lua);
    let class = tree.class(instance);
    match member {
        "Name" => {
            let name = match &value {
                Value::String(text) => text.to_str()?.to_owned(),
                Value::Integer(_) | Value::Number(_) => value.to_string()?,
                other => {
                    return Err(runtime_error(format!(
                        "Unable to assign property Name. string expected, got {}",
                        other.type_name()
                    )));
                }
            };
            if let Some(i) = tree.dom.borrow_mut().get_by_ref_mut(instance) {
                i.name = name;
            }
            tree.touch();
            tree.property_changed(lua, instance, "Name", None)
        }
        "Parent" => {
            let parent = instance_argument(&value, 1, "Parent").map_err(|_| {
                runtime_error(format!(
                    "Unable to assign property Parent. Instance expected, got {}",
                    value.type_name()
                ))
            })?;
            tree.set_parent(lua, instance, parent)
        }
        "Archivable" => {
            let Value::Boolean(archivable) = value else {
                return Err(runtime_error(format!(
                    "Unable to assign property Archivable. bool expected, got {}",
                    value.type_name()
                )));
            };
            tree.set_property(lua, instance, "Archivable", Variant::Bool(archivable))
        }
        "Value" if class_is_a(&class, "ValueBase") => {
            let variant = value_for(&class, &value).ok_or_else(|| {
                runtime_error(format!(
                    "Unable to assign property Value. {} expected, got {}",
                    expected_type(&class),
                    value.type_name()
                ))
            })?;
            if tree.property(instance, "Value") == Some(variant.clone()) {
                return Ok(());
            }
            tree.set_property(lua, instance, "Value", variant)
        }
        "OnInvoke" if class == "BindableFunction" => set_callback(&tree, instance, value),
        "OnServerInvoke" if class == "RemoteFunction" => set_callback(&tree, instance, value),
        "ClassName" => Err(runtime_error(
            "Unable to assign property ClassName. Property is read only".to_owned(),
        )),
        _ => {
            if reflected_assign(lua, &tree, instance, &class, member, &value)? {
                Ok(())
            } else {
                Err(tree.invalid_member(instance, member))
            }
        }
    }
}

fn set_callback(tree: &Tree, instance: Ref, value: Value) -> mlua::Result<()> {
    let callback = match value {
        Value::Function(function) => Some(function),
        Value::Nil => None,
        other => {
            return Err(runtime_error(format!(
                "Unable to assign callback. function expected, got {}",
                other.type_name()
            )));
        }
    };
    *tree.extras(instance).callback.borrow_mut() = callback;
    Ok(())
}

fn expected_type(class: &str) -> &'static str {
    match class {
        "IntValue" => "int64",
        "NumberValue" => "double",
        "StringValue" => "string",
        "BoolValue" => "bool",
        _ => "Instance",
    }
}

/// The stored form of a `Value` assigned to a `ValueBase` of `class`, if the type fits.
fn value_for(class: &str, value: &Value) -> Option<Variant> {
    let number = crate::palette::as_number(value);
    match class {
        "IntValue" => number.map(|n| Variant::Int64(n as i64)),
        "NumberValue" => number.map(Variant::Float64),
        "StringValue" => match value {
            Value::String(text) => Some(Variant::String(text.to_string_lossy())),
            _ => number.map(|n| Variant::String(Value::Number(n).to_string().unwrap_or_default())),
        },
        "BoolValue" => match value {
            Value::Boolean(b) => Some(Variant::Bool(*b)),
            _ => None,
        },
        "ObjectValue" => match value {
            Value::Nil => Some(Variant::Ref(Ref::none())),
            other => Instance::from_value(other).map(Variant::Ref),
        },
        _ => None,
    }
}

/// `Instance.new(className, parent?)` for the classes of the tree.
pub fn new_instance(lua: &Lua, class: &str, parent: Value) -> mlua::Result<Option<AnyUserData>> {
    if !CREATABLE.contains(&class) && !crate::reflection::creatable(class) {
        return Ok(None);
    }
    let tree = Tree::of(lua);
    let instance = tree.create(class, class);
    let parent = instance_argument(&parent, 2, "Instance.new")?;
    if parent.is_some() {
        tree.set_parent(lua, instance, parent)?;
    }
    Ok(Some(tree.handle(lua, instance)?))
}
