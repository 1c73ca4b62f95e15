"""Deterministic synthetic multi-sensor remote-sensing scenes and instruction samples for every task.

A :class:`Scene` is sensor independent: a land-cover label map (:data:`LANDCOVER_CLASSES`) plus objects
(:data:`OBJECT_CLASSES`), each with a position, size, heading and instance mask. Four renderers turn the same scene
into sensor-native arrays (``rgb`` uint8 HxWx3, ``sar`` float32 dB HxWx2 VV/VH, ``ir`` uint8 HxWx1, ``ms`` uint16
HxWx12 Sentinel-2-like reflectance x 10000), and task emitters turn a scene (or a before/after change pair) into a
:class:`~rsvlm_edge.training.sample.Sample` whose answer is rendered with :mod:`rsvlm_edge.formats` and whose
``target`` holds the structured truth for the metrics.

Everything is drawn from a caller-supplied :class:`numpy.random.Generator`; renderers use the scene's own
``noise_seed``, so the same seed always gives identical arrays and texts.

The package is split by layer, each module importing only the ones above it:

* :mod:`.vocab`: classes, sensors, mixtures, class words;
* :mod:`.geometry`: smooth noise, land-cover painters, object footprints;
* :mod:`.scene`: :class:`Scene`, :class:`SceneObject`, object placement, :data:`SCENE_RECIPES` and :func:`make_scene`;
* :mod:`.language`: position phrases, counts and plurals;
* :mod:`.change`: before/after :class:`ChangePair` s;
* :mod:`.render`: the four sensor renderers;
* :mod:`.emitters`: one emitter per task;
* :mod:`.generator`: :class:`SyntheticGenerator` and :func:`generate`.

Usage::

    gen = SyntheticGenerator(size=128, seed=0)
    sample = gen.sample()                      # task and sensor from the mixtures below
    sample = gen.sample("[VG]", sensor="sar")
    samples = generate(100, seed=1, tasks=["[CAP]", "[CLS]"])
"""

from __future__ import annotations

from rsvlm_edge.training.synthetic.change import ChangePair, make_change_pair
from rsvlm_edge.training.synthetic.emitters import (
    SCENE_EMITTERS,
    describe_object,
    emit_cap,
    emit_ccd,
    emit_change_seg,
    emit_cls,
    emit_det,
    emit_obb,
    emit_ref,
    emit_seg,
    emit_vg,
    emit_vqa,
)
from rsvlm_edge.training.synthetic.emitters import _referring_expressions as _referring_expressions
from rsvlm_edge.training.synthetic.generator import SyntheticGenerator, generate
from rsvlm_edge.training.synthetic.language import _position_phrase as _position_phrase
from rsvlm_edge.training.synthetic.render import (
    RENDERERS,
    SAR_LOOKS,
    render,
    render_infrared,
    render_multispectral,
    render_optical,
    render_sar,
)
from rsvlm_edge.training.synthetic.scene import (
    SCENE_RECIPES,
    ObjectSpec,
    Scene,
    SceneObject,
    SceneRecipe,
    make_scene,
)
from rsvlm_edge.training.synthetic.scene import _union as _union
from rsvlm_edge.training.synthetic.vocab import (
    CHANGE_LABEL,
    CHANGE_SEG_SHARE,
    HOT_TARGETS,
    LANDCOVER_CLASSES,
    LC,
    LC_AREA_WORDS,
    LC_ARTICLE_WORDS,
    LC_SEG_WORDS,
    LC_WORDS,
    MS_BANDS,
    NUMBER_WORDS,
    OBJ,
    OBJECT_CLASSES,
    PLURALS,
    SCENE_CLASSES,
    SCENE_LANDCOVER,
    SCENE_PHRASES,
    SENSOR_BANDS,
    SENSOR_LANDCOVER,
    SENSOR_MIXTURE,
    SENSOR_OBJECTS,
    SENSOR_SCENES,
    SENSORS,
    TASK_MIXTURE,
)

__all__ = [
    "CHANGE_LABEL", "CHANGE_SEG_SHARE", "HOT_TARGETS", "LANDCOVER_CLASSES", "LC", "LC_AREA_WORDS", "LC_ARTICLE_WORDS",
    "LC_SEG_WORDS", "LC_WORDS", "MS_BANDS", "NUMBER_WORDS", "OBJ", "OBJECT_CLASSES", "PLURALS", "RENDERERS", "SAR_LOOKS",
    "SCENE_CLASSES", "SCENE_EMITTERS", "SCENE_LANDCOVER", "SCENE_PHRASES", "SCENE_RECIPES", "SENSORS", "SENSOR_BANDS",
    "SENSOR_LANDCOVER", "SENSOR_MIXTURE", "SENSOR_OBJECTS", "SENSOR_SCENES", "TASK_MIXTURE", "ChangePair", "ObjectSpec",
    "Scene", "SceneObject", "SceneRecipe", "SyntheticGenerator", "describe_object", "emit_cap", "emit_ccd",
    "emit_change_seg", "emit_cls", "emit_det", "emit_obb", "emit_ref", "emit_seg", "emit_vg", "emit_vqa", "generate",
    "make_change_pair", "make_scene", "render", "render_infrared", "render_multispectral", "render_optical",
    "render_sar",
]
