"""Vocabulary of the synthetic generator: land-cover, object and scene classes, sensors, the task and sensor
mixtures, and the words the captions and questions use for each class.

Every other layer reads these tables; nothing here draws random numbers.
"""

from __future__ import annotations

from rsvlm_edge.config import DEFAULT_SENSORS

#: Land-cover classes of the label map (index = value in :attr:`Scene.landcover`).
LANDCOVER_CLASSES: tuple[str, ...] = ("water", "forest", "farmland", "residential", "industrial", "bare", "road")
#: Object classes (labels used in detection, grounding and segmentation answers).
OBJECT_CLASSES: tuple[str, ...] = ("building", "vehicle", "ship", "plane", "storage tank")
#: Scene classes of [CLS] answers (each scene is generated from the recipe of one of them).
SCENE_CLASSES: tuple[str, ...] = ("forest", "farmland", "residential", "industrial", "river", "lake", "airport",
                                  "harbor", "bare land", "parking lot")
SENSORS: tuple[str, ...] = tuple(DEFAULT_SENSORS)
SENSOR_BANDS: dict[str, int] = DEFAULT_SENSORS
#: Sentinel-2 band names of the 12 multispectral channels, in order.
MS_BANDS: tuple[str, ...] = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")
#: Label of the changed cells in a two-image [SEG] (change mask) answer.
CHANGE_LABEL = "change"

#: Share of each task when ``sample()`` gets no task.
TASK_MIXTURE: dict[str, float] = {"[CAP]": 0.12, "[VQA]": 0.16, "[CLS]": 0.10, "[VG]": 0.13, "[REF]": 0.10,
                                  "[SEG]": 0.13, "[CCD]": 0.06, "[DET]": 0.12, "[OBB]": 0.08}
#: Share of each sensor when ``sample()`` gets no sensor (every task is emitted for every sensor).
SENSOR_MIXTURE: dict[str, float] = {"rgb": 0.55, "sar": 0.17, "ir": 0.12, "ms": 0.16}
#: Share of [SEG] samples that are two-image change masks.
CHANGE_SEG_SHARE = 0.25

#: What each sensor shows. Vehicles are below the multispectral resolution (not rendered there); SAR and IR
#: questions and masks stick to land cover they separate (water, vegetation, built-up).
SENSOR_OBJECTS: dict[str, tuple[str, ...]] = {
    "rgb": OBJECT_CLASSES, "sar": OBJECT_CLASSES, "ir": OBJECT_CLASSES,
    "ms": ("building", "ship", "plane", "storage tank"),
}
SENSOR_LANDCOVER: dict[str, tuple[str, ...]] = {
    "rgb": LANDCOVER_CLASSES, "ms": LANDCOVER_CLASSES,
    "sar": ("water", "forest", "residential", "industrial"), "ir": ("water", "forest", "residential", "industrial"),
}
SENSOR_SCENES: dict[str, tuple[str, ...]] = {s: SCENE_CLASSES for s in SENSORS}
SENSOR_SCENES["ms"] = tuple(c for c in SCENE_CLASSES if c != "parking lot")
#: Objects the [DET] prompt "Detect all hot targets." asks for on infrared images.
HOT_TARGETS: tuple[str, ...] = ("vehicle", "ship")

LC = {name: i for i, name in enumerate(LANDCOVER_CLASSES)}
OBJ = {name: i for i, name in enumerate(OBJECT_CLASSES)}
_N_LC = len(LANDCOVER_CLASSES)
_SENSOR_INDEX = {s: i for i, s in enumerate(SENSORS)}

PLURALS = {"building": "buildings", "vehicle": "vehicles", "ship": "ships", "plane": "planes",
           "storage tank": "storage tanks"}
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
LC_WORDS = {"water": "water", "forest": "forest", "farmland": "farmland", "residential": "residential area",
            "industrial": "industrial area", "bare": "bare land", "road": "roads"}
LC_SEG_WORDS = {"water": "the water", "forest": "the forest", "farmland": "the farmland",
                "residential": "the residential area", "industrial": "the industrial area", "bare": "the bare land",
                "road": "the roads"}
LC_AREA_WORDS = {"water": "water area", "forest": "forest area", "farmland": "farmland area",
                 "residential": "residential area", "industrial": "industrial area", "bare": "bare land area",
                 "road": "road area"}
LC_ARTICLE_WORDS = {"water": "water", "forest": "forest", "farmland": "farmland", "residential": "a residential area",
                    "industrial": "an industrial area", "bare": "bare land", "road": "a road"}
#: The land-cover class a scene class is named after (captions do not repeat it).
SCENE_LANDCOVER = {"forest": "forest", "farmland": "farmland", "residential": "residential", "industrial": "industrial",
                   "bare land": "bare"}
SCENE_PHRASES = {"forest": "a forest", "farmland": "farmland", "residential": "a residential area",
                 "industrial": "an industrial area", "river": "a river", "lake": "a lake", "airport": "an airport",
                 "harbor": "a harbor", "bare land": "bare land", "parking lot": "a parking lot"}
