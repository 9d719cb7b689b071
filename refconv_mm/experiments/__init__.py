"""What the demo, the benchmarks and the tests run on, apart from the plugin's core.

Generated data sets (:mod:`.shapes_data`), configs that point installed
mmdet/mmseg/mmpretrain configs at them (:mod:`.shapes_configs`), two real offline digit
sets (:mod:`.digits_data`) and the MobileNetV3 arch sized for them (:mod:`.digits_model`),
readers of mmengine run logs (:mod:`.runlogs`) and interleaved, rotated timing of
variants against each other (:mod:`.timing`). ``import refconv_mm`` does not import them.
"""
