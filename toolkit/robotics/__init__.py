"""Robot data in and out, without a ROS installation.

bags.py         open ROS 1 / ROS 2 bags (rosbags), list topics, stream one image topic
image_msgs.py   sensor_msgs/Image and CompressedImage -> BGR frames or lossless image files
labels.py       start,end,label time ranges for labelling a bag's frames
import_bag.py   `edgetune import-bag`: a topic -> an ImageFolder/CSV dataset with provenance
bag_source.py   `watch --source bag:PATH?topic=...`: a bag replayed as a live source
foxglove_sink.py  frames + predictions to MCAP (`--record`) and live to Foxglove (`--foxglove`)
write_bags.py   write image bags (tests, benchmarks, demo data)
commands.py     the click commands and options
"""
