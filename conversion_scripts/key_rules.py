# Copyright 2026 The llava-multilayer authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Key rules: how the name of an original tensor becomes the name of a converted one.

A rule table maps a regular expression over the original key to the converted key (a template that may use the
expression's groups, `\\1`), or to a [`Drop`] that states why the tensor is deliberately not converted, in the
style of transformers' `ORIGINAL_TO_CONVERTED_KEY_MAPPING`:

```python
MY_RULES: KeyRules = {
    r"model\\.mm_projector\\.0\\.(weight|bias)": r"model.multi_modal_projector.linear_1.\\1",
    r".*rotary_emb\\.inv_freq": Drop("rotary inv_freq buffer (recomputed from the config)"),
}
```

Each expression must match the whole key; the first rule that matches decides. A key that no rule matches maps to
`None`, which the conversion pipeline refuses: no source tensor is ever ignored silently.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Drop:
    """Marks a source key that is deliberately not converted, with the reason (listed in the model card)."""

    reason: str


#: `mapping(original_key)` -> the converted key, a [`Drop`], or `None` for a key the mapping does not know.
KeyMapping = Callable[[str], "str | Drop | None"]

#: Regular expression over the whole original key -> converted-key template or [`Drop`].
KeyRules = Mapping[str, "str | Drop"]


def key_mapping(*tables: KeyRules) -> KeyMapping:
    """The [`KeyMapping`] of one or more rule tables, tried in order (the first matching rule decides)."""
    rules = [(re.compile(pattern), target) for table in tables for pattern, target in table.items()]

    def mapping(key: str) -> str | Drop | None:
        for pattern, target in rules:
            match = pattern.fullmatch(key)
            if match:
                return target if isinstance(target, Drop) else match.expand(target)
        return None

    return mapping


def describe_keys(keys, limit: int = 15) -> str:
    """The first `limit` of `keys` (sorted), for error messages."""
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
