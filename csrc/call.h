// One attention call after its tensors, declared once: fastattn.call.Call's fields, in its
// order (tests/test_call.py holds the two together). Every boundary a call crosses is derived from
// this list: the ops' schemas, their C++ signatures, the autograd's saved state, the bridge to the
// Python backends and the pybind entry points.
//   X(C++ type, name, schema type, schema default)
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <optional>
#include <type_traits>

#define FASTATTN_CALL_FIELDS(X)                                                                          \
  /* masks, normalised by the front door (fastattn.front_door) */                                     \
  X(OptTensor, key_padding, "Tensor?", "None")  /* (B, Nk) bool, true = ignore */                        \
  X(OptTensor, key_ranges, "Tensor?", "None")   /* (3, B) int32: begin, end, holes (fastattn.masks) */   \
  X(OptTensor, attn_mask, "Tensor?", "None")    /* (B, H, Nq, Nk) bool or float32, may be expanded */    \
  /* packed sequences: (B + 1,) int32 cumulative lengths and the longest; q, k, v (1, H, total, D) */   \
  X(OptTensor, cu_seqlens_q, "Tensor?", "None")                                                          \
  X(OptTensor, cu_seqlens_k, "Tensor?", "None")                                                          \
  X(c10::SymInt, max_seqlen_q, "SymInt", "0")                                                            \
  X(c10::SymInt, max_seqlen_k, "SymInt", "0")                                                            \
  /* options */                                                                                          \
  X(bool, causal, "bool", "False")                                                                       \
  X(double, scale, "float", "1.")                                                                        \
  X(double, dropout_p, "float", "0.")                                                                    \
  X(c10::SymInt, seed, "SymInt", "0")                                                                    \
  /* score modifiers (fastattn.reference defines them) */                                                \
  X(int64_t, window_left, "int", "-1")  /* keys before the aligned diagonal a query sees; -1: all */     \
  X(int64_t, window_right, "int", "-1")                                                                  \
  X(double, softcap, "float", "0.")            /* 0: off */                                              \
  X(OptTensor, alibi_slopes, "Tensor?", "None") /* (H,) or (B, H) float32 */                             \
  X(OptTensor, sinks, "Tensor?", "None")        /* (H,) float32 */                                       \
  X(bool, bottom_right, "bool", "False")        /* causal, window and ALiBi aligned bottom-right */

namespace fastattn {

using OptTensor = std::optional<at::Tensor>;

// A field as a function parameter: what the dispatcher passes for its schema type; from Python
// (pybind), a SymInt as a plain int (its caster costs a small call ~1 us).
template <class T>
using CallParam = std::conditional_t<std::is_same_v<T, OptTensor>, const OptTensor&, T>;
template <class T>
using PyCallParam = std::conditional_t<std::is_same_v<T, c10::SymInt>, int64_t, CallParam<T>>;

struct Call {
#define FASTATTN_MEMBER_(type, name, ...) type name;
  FASTATTN_CALL_FIELDS(FASTATTN_MEMBER_)
#undef FASTATTN_MEMBER_
  bool varlen() const { return cu_seqlens_q.has_value(); }
};

// Each field's position, for what is indexed by it (the autograd's gradient slots).
enum class CallField {
#define FASTATTN_ENUM_(type, name, ...) name,
  FASTATTN_CALL_FIELDS(FASTATTN_ENUM_)
#undef FASTATTN_ENUM_
  count
};

}  // namespace fastattn

// The fields as a parameter list's tail (", const OptTensor& key_padding, ..."; PY_: pybind's), as the
// arguments that rebuild a Call from those parameters ("Call{key_padding, ...}"), as a call's
// members passed on (", call.key_padding, ...": a Call named `call` in scope), and as a schema's tail (", Tensor? key_padding=None, ...").
#define FASTATTN_PARAM_(type, name, ...) , ::fastattn::CallParam<type> name
#define FASTATTN_CALL_PARAMS FASTATTN_CALL_FIELDS(FASTATTN_PARAM_)
#define FASTATTN_PY_PARAM_(type, name, ...) , ::fastattn::PyCallParam<type> name
#define FASTATTN_PY_CALL_PARAMS FASTATTN_CALL_FIELDS(FASTATTN_PY_PARAM_)
#define FASTATTN_NAME_(type, name, ...) name,
#define FASTATTN_CALL_FROM_PARAMS ::fastattn::Call{FASTATTN_CALL_FIELDS(FASTATTN_NAME_)}
#define FASTATTN_ARG_(type, name, ...) , call.name
#define FASTATTN_CALL_MEMBERS FASTATTN_CALL_FIELDS(FASTATTN_ARG_)
#define FASTATTN_SCHEMA_(type, name, schema_type, schema_default) ", " schema_type " " #name "=" schema_default
#define FASTATTN_CALL_SCHEMA FASTATTN_CALL_FIELDS(FASTATTN_SCHEMA_)
