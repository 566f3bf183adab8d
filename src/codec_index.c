/*
 * codec_index.c - the module index: objects reachable from package.loaded
 * -> the bytes of their PZ_T_MODULE or PZ_T_MEMBER reference.
 *
 * A module table, or a C function, cannot travel by value (a C function not
 * at all), and a module's tables and functions should arrive as the
 * receiving state's own; so the encoder writes what package.loaded holds as
 * a name.  The index is built from package.loaded and cached in the
 * registry.  A top-level encode that meets a table or function compares,
 * once, package.loaded with the copy of it the index was built from, and
 * rebuilds the index when a module was loaded, dropped or replaced since,
 * so that a module required a moment ago travels by reference; where
 * LuaJIT's layout is known (codec_layout.h), a snapshot of package.loaded's
 * bytes answers first, without running Lua (see index_state).  Building
 * visits every member of every module, so it is not done otherwise, except
 * once for a C function the index does not know (which could not travel at
 * all); and a hit is checked against package.loaded before it is used, so
 * that a member reassigned since is not sent as a reference to its
 * successor.  A Lua function added to a loaded module after the index was
 * built travels by value.
 */
#include <lauxlib.h>
#include <lua.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "codec_enc.h"
#include "codec_layout.h"

/* Registry key of the index's keeper (its address is what counts). */
static const char reg_keeper = 0;

/* Pushes the bytes of a reference: PZ_T_MODULE name, or PZ_T_MEMBER name key
 * when key is not NULL. */
static void push_ref_bytes(lua_State *L, const char *name, size_t n, const char *key, size_t kn)
{
    luaL_Buffer b;
    uint8_t tmp[PZ_VARINT_MAX_BYTES];
    luaL_buffinit(L, &b);
    luaL_addchar(&b, (char)(key ? PZ_T_MEMBER : PZ_T_MODULE));
    luaL_addlstring(&b, (const char *)tmp, pz_put_varint(tmp, n));
    luaL_addlstring(&b, name, n);
    if (key) {
        luaL_addlstring(&b, (const char *)tmp, pz_put_varint(tmp, kn));
        luaL_addlstring(&b, key, kn);
    }
    luaL_pushresult(&b);
}

/* index[value at -1] = bytes at -2 unless already set; pops both. */
static void index_set_new(lua_State *L, int index)
{
    lua_pushvalue(L, -1);
    lua_rawget(L, index);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_insert(L, -2);
        lua_rawset(L, index);
    } else {
        lua_pop(L, 3);
    }
}

/* Adds the members of the module table at stack index mod (named name)
 * that are functions or tables.  From the globals table only C functions
 * are taken: a user's global would not exist in a fresh state. */
static void index_members(lua_State *L, int index, int mod, const char *name, size_t n)
{
    int only_c;
    lua_pushvalue(L, mod);
    only_c = lua_rawequal(L, -1, LUA_GLOBALSINDEX);
    lua_pop(L, 1);
    lua_pushnil(L);
    while (lua_next(L, mod)) {
        int t = lua_type(L, -1);
        if (lua_type(L, -2) == LUA_TSTRING &&
            (only_c ? lua_iscfunction(L, -1) : (t == LUA_TTABLE || t == LUA_TFUNCTION))) {
            size_t kn;
            const char *k = lua_tolstring(L, -2, &kn);
            push_ref_bytes(L, name, n, k, kn);
            lua_pushvalue(L, -2);
            index_set_new(L, index);
        }
        lua_pop(L, 1);
    }
}

/* Pushes a filter passing the addresses of the keys of the table at index. */
static void push_addr_filter(lua_State *L, int index)
{
    uint64_t n = 0, bits = 512, a, b;
    pz_addr_filter *f;
    lua_pushnil(L);
    while (lua_next(L, index)) {
        lua_pop(L, 1);
        n++;
    }
    while (bits < 64 * n && bits < (UINT64_C(1) << 24))
        bits *= 2;
    f = (pz_addr_filter *)lua_newuserdata(L, sizeof *f + (size_t)(bits / 64) * sizeof f->word[0]);
    f->mask = bits - 1;
    memset(f->word, 0, (size_t)(bits / 64) * sizeof f->word[0]);
    lua_pushnil(L);
    while (lua_next(L, index)) {
        pz_addr_bits(f, lua_topointer(L, -2), &a, &b);
        f->word[a >> 6] |= UINT64_C(1) << (a & 63);
        f->word[b >> 6] |= UINT64_C(1) << (b & 63);
        lua_pop(L, 1);
    }
}

/* Pushes a new table with weak keys. */
static void push_weak_keys(lua_State *L, int nhash)
{
    lua_createtable(L, 0, nhash);
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "k");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
}

/* build(loaded) -> index, filter: a new index of the package.loaded given
 * (an empty one when it is not a table) and the filter of its addresses.  Module
 * values come first, so an object that is both a module and a member is
 * referred to as the module.  Weak keys: the index must not keep an
 * unloaded module alive. */
static int index_build(lua_State *L)
{
    int index;
    luaL_checkstack(L, 10, "cannot encode: stack overflow");
    lua_settop(L, 1);
    push_weak_keys(L, 64);
    index = lua_gettop(L);
    if (lua_istable(L, 1)) {
        lua_pushnil(L);
        while (lua_next(L, 1)) {
            int t = lua_type(L, -1);
            if (lua_type(L, -2) == LUA_TSTRING && (t == LUA_TTABLE || t == LUA_TFUNCTION)) {
                size_t len;
                const char *name = lua_tolstring(L, -2, &len);
                push_ref_bytes(L, name, len, NULL, 0);
                lua_pushvalue(L, -2);
                index_set_new(L, index);
            }
            lua_pop(L, 1);
        }
        lua_pushnil(L);
        while (lua_next(L, 1)) {
            if (lua_type(L, -2) == LUA_TSTRING && lua_istable(L, -1)) {
                size_t len;
                const char *name = lua_tolstring(L, -2, &len);
                index_members(L, index, lua_gettop(L), name, len);
            }
            lua_pop(L, 1);
        }
    }
    push_addr_filter(L, index);
    return 2;
}

/* The index's keeper, compiled once per state with the registry and
 * index_build: current(force) -> index, filter, rebuilt.  It keeps the index,
 * its address filter, and package.loaded as the index saw it (keys and
 * values in traversal order, held weakly: a copy must not keep an unloaded
 * module alive); it builds them again when forced, or when package.loaded
 * changed: a module loaded, dropped or replaced.  Every top-level encode
 * that meets a table or function runs it, so it is Lua: the interpreter's
 * iterator keeps its place where each lua_next call hashes its key again
 * to find it, and the loop is compiled.  An unchanged table keeps its
 * traversal order, so an equal sequence of keys and values means an
 * unchanged package.loaded; a changed one may keep its order, which the
 * values or the count then tell. */
static const char current_src[] =
    "local registry, build = ...\n"
    "local next, setmetatable, type = next, setmetatable, type\n"
    "local index, filter\n"
    "local keys = setmetatable({}, {__mode = 'v'})\n"
    "local values = setmetatable({}, {__mode = 'v'})\n"
    "local count = -1\n"
    "return function(force)\n"
    "  local loaded = registry._LOADED\n"
    "  if type(loaded) ~= 'table' then loaded = nil end\n"
    "  if index and not force then\n"
    "    local i = 0\n"
    "    if loaded then\n"
    "      for k, v in next, loaded do\n"
    "        i = i + 1\n"
    "        if keys[i] ~= k or values[i] ~= v then i = -2; break end\n"
    "      end\n"
    "    end\n"
    "    if i == count then return index, filter, false end\n"
    "  end\n"
    "  index, filter = build(loaded)\n"
    "  local n = 0\n"
    "  if loaded then\n"
    "    for k, v in next, loaded do\n"
    "      n = n + 1\n"
    "      keys[n], values[n] = k, v\n"
    "    end\n"
    "  end\n"
    "  for i = n + 1, count do keys[i], values[i] = nil, nil end\n"
    "  count = n\n"
    "  return index, filter, true\n"
    "end\n";

/* What the state keeps of the index, beside the keeper: enough to tell,
 * reading LuaJIT's objects directly (codec_layout.h), that package.loaded
 * is as the keeper last saw it, in tens of nanoseconds where the keeper's
 * walk costs over a hundred; every top-level encode of a table asks.  The
 * snapshot is the bytes of package.loaded's array slots and hash nodes
 * (keys, values and links), taken before the keeper looked: any write to
 * package.loaded changes them or moves them.  Equal bytes could still
 * name a new object at a dead one's address (a module dropped, collected,
 * and another one stored under its name); a collection frees objects only
 * after its atomic phase, which also empties a weak table's slot whose
 * value nothing else holds: the sentinel.  So equal bytes and a sentinel
 * still in place mean the same package.loaded. */
typedef struct index_state {
    int valid;                  /* the fields below hold a snapshot */
    const uint8_t *registry;    /* the registry table */
    const uint8_t *reg_nodes;   /* its nodes, hmask, and the node holding */
    uint32_t reg_hmask;         /* key "_LOADED" */
    const uint8_t *reg_node;
    pz_tv reg_key, reg_val;     /* that node's key and value */
    const uint8_t *loaded;      /* package.loaded: array and nodes */
    const pz_tv *array;
    const uint8_t *nodes;
    uint32_t asize, hmask;
    const uint8_t *sentinel;    /* a weak table; slot 1 holds a table
                                 * nothing else does */
    uint8_t *snap;              /* asize * 8 + (hmask + 1) * node bytes: a
                                 * userdata the environment holds */
    size_t snap_cap;
    const pz_addr_filter *filter; /* the keeper's filter at the snapshot */
    int cached;                 /* 1 + its entry in states[], or 0 */
    unsigned generation;        /* snapshots taken so far */
} index_state;

/* Slots of the state's environment table. */
enum { ENV_KEEPER = 1, ENV_INDEX, ENV_FILTER, ENV_SENTINEL, ENV_LOADED_NAME, ENV_SNAP, ENV_SLOTS = 6 };

/* The index states of the process's Lua states, by registry table: a
 * lookup here costs a few loads where the registry's costs three calls of
 * the C API, and every top-level encode of a table makes one.  An entry is
 * published when its state is made and cleared by its finalizer, which
 * lua_close runs before the registry's memory is freed, so a registry's
 * address never finds another state's entry.  Lua's rule (one thread at a
 * time in a state) is what makes the lookup safe without a lock: only a
 * state's own thread publishes, reads or clears its entry.  Past
 * STATES_CACHED states, the others look in their registry. */
#define STATES_CACHED 16
static struct {
    _Atomic(const void *) registry;
    _Atomic(index_state *) state;
} states[STATES_CACHED];

static void states_publish(const void *registry, index_state *st)
{
    for (int i = 0; i < STATES_CACHED; i++) {
        const void *none = NULL;
        /* Claimed first, filled after: only this state's thread looks for
         * this registry, and not before this returns. */
        if (atomic_compare_exchange_strong(&states[i].registry, &none, registry)) {
            atomic_store(&states[i].state, st);
            st->cached = i + 1;
            return;
        }
    }
}

static index_state *states_find(const void *registry)
{
    for (int i = 0; i < STATES_CACHED; i++)
        if (atomic_load_explicit(&states[i].registry, memory_order_acquire) == registry)
            return atomic_load_explicit(&states[i].state, memory_order_relaxed);
    return NULL;
}

static int index_state_gc(lua_State *L)
{
    index_state *st = (index_state *)lua_touserdata(L, 1);
    if (st->cached)
        atomic_store(&states[st->cached - 1].registry, NULL);
    st->cached = 0;
    st->valid = 0;
    return 0;
}

/* Pushes the index state (see index_state), making it on first use: the
 * keeper compiled (see current_src), an empty sentinel. */
static index_state *push_state(lua_State *L)
{
    index_state *st;
    lua_pushlightuserdata(L, (void *)&reg_keeper);
    lua_rawget(L, LUA_REGISTRYINDEX);
    if ((st = (index_state *)lua_touserdata(L, -1)))
        return st;
    lua_pop(L, 1);
    st = (index_state *)lua_newuserdata(L, sizeof *st);
    memset(st, 0, sizeof *st);
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, index_state_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    lua_createtable(L, ENV_SLOTS, 0);
    if (luaL_loadbuffer(L, current_src, sizeof current_src - 1, "=parallelize.codec.index"))
        lua_error(L);
    lua_pushvalue(L, LUA_REGISTRYINDEX);
    lua_pushcfunction(L, index_build);
    lua_call(L, 2, 1);
    lua_rawseti(L, -2, ENV_KEEPER);
    lua_createtable(L, 1, 0); /* the sentinel */
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "v");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
    st->sentinel = lua_topointer(L, -1);
    lua_rawseti(L, -2, ENV_SENTINEL);
    lua_pushliteral(L, "_LOADED");
    lua_rawseti(L, -2, ENV_LOADED_NAME);
    lua_setfenv(L, -2);
    lua_pushlightuserdata(L, (void *)&reg_keeper);
    lua_pushvalue(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
    states_publish(lua_topointer(L, LUA_REGISTRYINDEX), st);
    return st;
}

/* True when slot 1 of the sentinel still holds its table: no collection
 * reached its atomic phase since it was put there. */
static int sentinel_holds(const index_state *st)
{
    return pz_tab_asize(st->sentinel) > 1 && !pz_tv_isnil(pz_tab_array(st->sentinel)[1]);
}

/* Takes the snapshot of package.loaded into st, whose environment is at
 * env; invalid when the layout is not known or there is no package.loaded
 * table.  Puts a new table in the sentinel first when it was emptied: every
 * allocation is over before the bytes are read. */
static void snapshot(lua_State *L, index_state *st, int env)
{
    st->valid = 0;
    if (!pz_layout_known())
        return;
    if (!sentinel_holds(st)) {
        lua_rawgeti(L, env, ENV_SENTINEL);
        lua_createtable(L, 0, 0);
        lua_rawseti(L, -2, 1);
        lua_pop(L, 1);
    }
    lua_rawgeti(L, env, ENV_LOADED_NAME);
    const uint8_t *name = lua_topointer(L, -1);
    lua_pop(L, 1); /* the environment holds it */
    for (;;) {
        const uint8_t *reg = lua_topointer(L, LUA_REGISTRYINDEX);
        const uint8_t *nodes = pz_tab_nodes(reg), *node = NULL;
        uint32_t hmask = pz_tab_hmask(reg);
        for (uint32_t i = 0; i <= hmask && !node; i++) {
            pz_tv key = pz_node_key(nodes + (size_t)i * PZ_NODE_SIZE);
            if (pz_tv_tag(key) == PZ_TAG_STR && pz_tv_obj(key) == name &&
                !pz_tv_isnil(pz_node_val(nodes + (size_t)i * PZ_NODE_SIZE)))
                node = nodes + (size_t)i * PZ_NODE_SIZE;
        }
        if (!node || pz_tv_tag(pz_node_val(node)) != PZ_TAG_TAB)
            return; /* no package.loaded table: the keeper every time */
        const uint8_t *t = pz_tv_obj(pz_node_val(node));
        size_t abytes = (size_t)pz_tab_asize(t) * sizeof(pz_tv);
        size_t need = abytes + ((size_t)pz_tab_hmask(t) + 1) * PZ_NODE_SIZE;
        if (need > st->snap_cap) {
            /* In the Lua heap, held by the environment: the allocation may
             * run a collection step and finalizers, so everything is read
             * again after it. */
            st->snap = lua_newuserdata(L, need);
            st->snap_cap = need;
            lua_rawseti(L, env, ENV_SNAP);
            continue;
        }
        st->registry = reg;
        st->reg_nodes = nodes;
        st->reg_hmask = hmask;
        st->reg_node = node;
        st->reg_key = pz_node_key(node);
        st->reg_val = pz_node_val(node);
        st->loaded = t;
        st->array = pz_tab_array(t);
        st->asize = pz_tab_asize(t);
        st->nodes = pz_tab_nodes(t);
        st->hmask = pz_tab_hmask(t);
        if (abytes)
            memcpy(st->snap, st->array, abytes);
        memcpy(st->snap + abytes, st->nodes, need - abytes);
        st->valid = 1;
        return;
    }
}

/* True when package.loaded is as at st's snapshot (see index_state). */
static int snapshot_current(const void *registry, const index_state *st)
{
    if (!st->valid || registry != st->registry)
        return 0;
    const uint8_t *reg = st->registry, *t = st->loaded;
    if (pz_tab_nodes(reg) != st->reg_nodes || pz_tab_hmask(reg) != st->reg_hmask ||
        pz_node_key(st->reg_node) != st->reg_key || pz_node_val(st->reg_node) != st->reg_val)
        return 0;
    if (pz_tab_array(t) != st->array || pz_tab_asize(t) != st->asize ||
        pz_tab_nodes(t) != st->nodes || pz_tab_hmask(t) != st->hmask)
        return 0;
    size_t abytes = (size_t)st->asize * sizeof(pz_tv);
    if ((abytes && memcmp(st->snap, st->array, abytes)) ||
        memcmp(st->snap + abytes, st->nodes, ((size_t)st->hmask + 1) * PZ_NODE_SIZE))
        return 0;
    return sentinel_holds(st);
}

/* Puts a current index and its address filter in their slots: rebuilt when
 * forced, else as the keeper finds it, unless the snapshot shows
 * package.loaded unchanged: then only the filter, the index slot being
 * filled when a lookup needs it (pz_index_put). */
static void index_current(enc *e, int force)
{
    lua_State *L = e->L;
    index_state *st = push_state(L);
    int state = lua_gettop(L);
    lua_getfenv(L, state);
    int env = state + 1;
    if (!force && snapshot_current(lua_topointer(L, LUA_REGISTRYINDEX), st)) {
        lua_rawgeti(L, env, ENV_FILTER);
        e->index_filter = st->filter;
        lua_replace(L, enc_slot(e, ES_INDEX_FILTER));
        e->index_deferred = 1;
        lua_settop(L, state - 1);
        return;
    }
    /* The snapshot is taken before the keeper looks, so that a change
     * while it runs is seen next time; it counts only once the keeper's
     * index and filter are in, and only if no encode nested in the keeper
     * (from a finalizer) took another meanwhile: an error raised in the
     * keeper, or a nested encode, must not leave an old filter current. */
    snapshot(L, st, env);
    int taken = st->valid;
    unsigned generation = ++st->generation;
    st->valid = 0;
    lua_rawgeti(L, env, ENV_KEEPER);
    lua_pushboolean(L, force);
    lua_call(L, 1, 3);
    if (lua_toboolean(L, -1))
        e->index_fresh = 1;
    lua_pop(L, 1);
    e->index_filter = lua_touserdata(L, -1);
    if (st->generation == generation) {
        lua_pushvalue(L, -1);
        lua_rawseti(L, env, ENV_FILTER);
        lua_pushvalue(L, -2);
        lua_rawseti(L, env, ENV_INDEX);
        st->filter = e->index_filter;
        st->valid = taken;
    }
    lua_replace(L, enc_slot(e, ES_INDEX_FILTER));
    lua_replace(L, enc_slot(e, ES_INDEX));
    e->index_deferred = 0;
    lua_settop(L, state - 1);
}

/* Fills the index slot left empty by index_current. */
static void index_slot_fill(enc *e)
{
    lua_State *L = e->L;
    push_state(L);
    lua_getfenv(L, -1);
    lua_rawgeti(L, -1, ENV_INDEX);
    lua_replace(L, enc_slot(e, ES_INDEX));
    lua_pop(L, 2);
    e->index_deferred = 0;
}

/* Sets e->index_filter to the current index's filter and returns 1 when
 * the snapshot shows package.loaded unchanged, without running Lua or
 * using the encoder's stack slots: only for the direct walk, which runs no
 * Lua either, so the filter needs no anchor while it is used.  Returns 0
 * otherwise, having changed nothing in e. */
int pz_index_quick(enc *e)
{
    lua_State *L = e->L;
    int current;
    if (!pz_layout_known())
        return 0;
    const void *registry = lua_topointer(L, LUA_REGISTRYINDEX);
    index_state *st = states_find(registry);
    if (!st) {
        st = push_state(L);
        lua_pop(L, 1); /* the registry holds it */
    }
    current = snapshot_current(registry, st);
    if (current)
        e->index_filter = st->filter;
    return current;
}

/* Rebuilds the index into its slots. */
void pz_index_rebuild(enc *e)
{
    index_current(e, 1);
}

/* Makes sure the index slots hold an index that knows every module in
 * package.loaded, once per top-level encode. */
void pz_index_ready(enc *e)
{
    if (e->index_checked)
        return;
    e->index_checked = 1;
    index_current(e, 0);
}

/* Reads one name (varint length, bytes) of the reference bytes [*p, end). */
static int ref_name(const uint8_t **p, const uint8_t *end, const char **name, size_t *n)
{
    uint64_t len;
    if (pz_get_varint(p, end, &len) || len > (uint64_t)(end - *p))
        return -1;
    *name = (const char *)*p;
    *n = (size_t)len;
    *p += len;
    return 0;
}

/* True when the reference bytes s[0..n) (see push_ref_bytes) still name the
 * object at idx in package.loaded: the index may be older than a module
 * replaced under the same name, or a member reassigned. */
static int ref_still_names(lua_State *L, const char *s, size_t n, int idx)
{
    const uint8_t *p = (const uint8_t *)s + 1, *end = (const uint8_t *)s + n;
    const char *name, *key = NULL;
    size_t nlen, klen = 0;
    int same;
    if (ref_name(&p, end, &name, &nlen) ||
        ((uint8_t)s[0] == PZ_T_MEMBER && ref_name(&p, end, &key, &klen)))
        return 0;
    lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        return 0;
    }
    lua_pushlstring(L, name, nlen);
    lua_rawget(L, -2);
    if (key) {
        if (!lua_istable(L, -1)) {
            lua_pop(L, 2);
            return 0;
        }
        lua_pushlstring(L, key, klen);
        lua_rawget(L, -2);
        lua_remove(L, -2);
    }
    same = lua_rawequal(L, -1, idx);
    lua_pop(L, 2);
    return same;
}

/* Looks the object at idx up in the index; when it is there and still
 * named so in package.loaded, writes its reference, gives it a reference
 * number and returns 1; else returns 0.  A stale hit rebuilds the index
 * (once per top-level encode) and looks again. */
int pz_index_put(enc *e, int idx, const void *obj)
{
    lua_State *L = e->L;
    size_t n;
    const char *s;
    for (;;) {
        if (!e->index_filter || !pz_addr_may_hold(e->index_filter, obj))
            return 0;
        if (e->index_deferred)
            index_slot_fill(e);
        lua_pushvalue(L, idx);
        lua_rawget(L, enc_slot(e, ES_INDEX));
        if (lua_type(L, -1) != LUA_TSTRING) {
            lua_pop(L, 1);
            return 0;
        }
        s = lua_tolstring(L, -1, &n);
        if (ref_still_names(L, s, n, idx))
            break;
        lua_pop(L, 1);
        if (e->index_fresh)
            return 0;
        pz_index_rebuild(e);
    }
    put_bytes(e, s, n);
    lua_pop(L, 1);
    pz_ref_add(e, idx, obj);
    return 1;
}

/* Compiles the keeper now, while next, setmetatable and type are the
 * standard ones. */
void pz_index_prepare(lua_State *L)
{
    push_state(L);
    lua_pop(L, 1);
}
