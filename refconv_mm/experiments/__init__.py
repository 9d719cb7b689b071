"""What the demo, the benchmarks and the tests run on, apart from the plugin's core.

Generated data sets (:mod:`.shapes_data`), configs that point installed
mmdet/mmseg/mmpretrain configs at them (:mod:`.shapes_configs`) and readers of
mmengine run logs (:mod:`.runlogs`). ``import refconv_mm`` does not import them.
"""
