"""Step 2 of the model conversion, run by Python 3.7 with TensorFlow 1.15: arrays.npz -> bert_model.ckpt.

    python3.7 tf_checkpoint.py ARRAYS.npz OUT_DIR/bert_model.ckpt

One tf.Variable per array, under the array's name, saved with tf.train.Saver. (Python 3.7
syntax only: this file runs in the server's venv.)
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")   # TensorFlow's start-up chatter is not an error

import numpy as np  # noqa: E402
import tensorflow.compat.v1 as tf  # noqa: E402


def save_checkpoint(npz_path, ckpt_path):
    """Save every array of NPZ_PATH as a variable of the same name in the checkpoint CKPT_PATH."""
    arrays = np.load(npz_path)
    with tf.Graph().as_default():
        variables = [tf.Variable(arrays[name], name=name) for name in arrays.files]
        saver = tf.train.Saver(variables)
        with tf.Session() as session:
            session.run(tf.global_variables_initializer())
            saver.save(session, ckpt_path, write_meta_graph=False)


if __name__ == "__main__":
    save_checkpoint(sys.argv[1], sys.argv[2])
